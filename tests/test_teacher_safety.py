"""A hostile user's teacher settings (issue 15, findings 4 and 5), against 127.0.0.1 only.

- Secrets: a base URL or replica with credentials (user@ or user:pass@), a ?query or a #fragment
  is refused at config validation, before a run directory exists, so config.yaml and env.json
  (which records the command line) never hold one; a key the server echoes in a successful
  completion, or any key-shaped string, is redacted before it reaches annotations.jsonl, the
  store or `store export`, and counted in summary.json.
- Failures: a URL no request can reach (ftp://, no scheme) is refused before any request; a run
  whose every request failed exits 1 quickly with the reason, after summary.json records it; a
  run with many failures completes and says so.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stepdistill import api
from stepdistill.config import AnnotateRun, build
from stepdistill.errors import ConfigError, StepDistillError
from stepdistill.tasks import get_task
from stepdistill.testing import openai_server
from stepdistill.testing.openai_server import FakeOpenAIServer

GOLD = {e.input: e.label for e in get_task("quickstart").load("train")}
SECRET = "sk-proj-HOSTILE0user0secret0key0123456789"  # key-shaped: the review's `http://sk-...@host` case
KEY_ENV = "SD_SAFETY_TEST_KEY"
KEY = "planted-key-7c1e0b9a52d4f3e8"  # not key-shaped: only knowing the key redacts it


def right_answer(prompt: str, body: dict) -> str:
    return f"Step by step. The answer is {GOLD[prompt.rsplit('Q: ', 1)[1].split(chr(10) + 'A:')[0].strip()]}."


def cfg(base_url: str, n: int = 4, **teacher) -> dict:
    t = {"kind": "openai", "base_url": base_url, "model": "fake-model", "concurrency": 4, "timeout": 5,
         "backoff": 0.01, "backoff_max": 0.05, "max_retries": 0, "sampling": {"max_new_tokens": 64}, **teacher}
    return {"task": {"name": "quickstart"}, "split": "train", "limit": n, "teacher": t}


def files_holding(root: Path, needle: str) -> list[str]:
    return [str(f) for f in root.rglob("*") if f.is_file() and needle.encode() in f.read_bytes()]


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(tmp_path: Path, out: str, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """`stepdistill annotate` in its own process, so env.json records a real command line."""
    env = {**os.environ, "STEPDISTILL_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "stepdistill.cli", "annotate", "--task", "quickstart", "--split", "train",
           "--teacher", "openai", "--model", "fake-model", "--store", str(tmp_path / "store.sqlite"),
           "--out", str(tmp_path / out), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


# ---------------------------------------------------------------- URLs: refused before anything is written


def test_a_username_only_credential_in_the_base_url_is_refused_and_nothing_is_written(tmp_path):
    proc, _ = cli(tmp_path, "run", "--limit", "2", "--base-url", f"http://{SECRET}@127.0.0.1:{closed_port()}/v1")
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "must not carry credentials" in err and "teacher.api_key_env" in err
    assert SECRET not in err and SECRET not in proc.stdout
    assert not (tmp_path / "run").exists()  # no config.yaml, no env.json with the command line
    assert files_holding(tmp_path, SECRET) == []


@pytest.mark.parametrize("field", ["base_url", "replicas"])
@pytest.mark.parametrize("url, problem", [
    (f"http://{SECRET}@127.0.0.1:8000/v1", "must not carry credentials"),
    (f"http://user:{SECRET}@127.0.0.1:8000/v1", "must not carry credentials"),
    (f"http://127.0.0.1:8000/v1?api_key={SECRET}", "must not have a ?query or #fragment"),
    (f"http://127.0.0.1:8000/v1#{SECRET}", "must not have a ?query or #fragment"),
])
def test_credentials_a_query_or_a_fragment_in_a_url_are_refused_without_echoing_them(field, url, problem):
    data = cfg("http://127.0.0.1:8000/v1")
    data["teacher"][field] = url if field == "base_url" else ["http://127.0.0.1:8001/v1", url]
    with pytest.raises(ConfigError, match=f"1 problem: teacher.{field}: {problem}".replace("?", r"\?")) as e:
        build(AnnotateRun, data)
    assert SECRET not in str(e.value) and "***" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("url, problem", [
    ("ftp://127.0.0.1:8000/v1", "not an http(s) URL"),
    ("localhost:8000", "not an http(s) URL"),
    ("127.0.0.1:8000/v1", "not an http(s) URL"),
    ("http:///v1", "has no host"),
    ("http://127.0.0.1:99999/v1", "has an invalid port"),
])
def test_a_url_no_request_can_reach_is_refused_before_any_request(tmp_path, url, problem):
    with pytest.raises(ConfigError, match=f"teacher.base_url: {problem}".replace("(", r"\(").replace(")", r"\)")):
        api.annotate(cfg(url), tmp_path / "run", store_path=tmp_path / "s.sqlite", echo=lambda _: None)
    assert not (tmp_path / "run").exists() and not (tmp_path / "s.sqlite").exists()


def test_a_key_given_as_api_key_env_is_refused_before_the_run_is_written(tmp_path):
    with FakeOpenAIServer(right_answer) as srv:
        with pytest.raises(StepDistillError, match="names the environment variable that holds the key, not the key"):
            api.annotate(cfg(srv.url, api_key_env=SECRET), tmp_path / "run", store_path=tmp_path / "s.sqlite",
                         echo=lambda _: None)
        assert srv.log == []
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- keys in successful completions


@pytest.fixture
def echoing_server(monkeypatch):
    """A server whose every completion repeats the Authorization header it was sent, a key-shaped
    string and a bearer token, then answers right."""
    seen = threading.local()
    serve = openai_server._Handler._serve

    def recording(self):
        seen.auth = self.headers.get("Authorization")
        return serve(self)

    def echo(prompt: str, body: dict) -> str:
        return (f"You sent {seen.auth}; the key is {seen.auth.removeprefix('Bearer ')}. Another: {SECRET}. "
                + right_answer(prompt, body))

    monkeypatch.setattr(openai_server._Handler, "_serve", recording)
    with FakeOpenAIServer(echo) as srv:
        yield srv


def test_a_key_echoed_in_a_successful_completion_is_redacted_everywhere_and_counted(echoing_server, tmp_path,
                                                                                    monkeypatch):
    from stepdistill.cli import run as cli_run

    monkeypatch.setenv(KEY_ENV, KEY)
    printed = []
    s = api.annotate(cfg(echoing_server.url, api_key_env=KEY_ENV), tmp_path / "run",
                     store_path=tmp_path / "store.sqlite", echo=printed.append)
    # per completion: "Bearer KEY" (the bearer shape), KEY (the key itself), SECRET (the key shape)
    assert s["redacted_secrets"] == 3 * 4 and s["usage"]["redacted_secrets"] == 12
    assert any("redacted 12 API keys" in line for line in printed)
    assert s["kept"] == 4 and s["teacher_accuracy"] == 1.0  # the rationale around them is intact
    rows = [json.loads(x) for x in (tmp_path / "run" / "annotations.jsonl").read_text().splitlines()]
    assert all(r["completion"].count("[redacted]") == 3 and "The answer is" in r["completion"] for r in rows)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["redacted_secrets"] == 12
    assert cli_run(["store", "export", "--store", str(tmp_path / "store.sqlite"), "--out", str(tmp_path / "x.jsonl")]) == 0
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == 4
    # the run, the store (sqlite and any -wal) and the export
    assert files_holding(tmp_path, KEY) == [] and files_holding(tmp_path, SECRET) == []


# ---------------------------------------------------------------- runs where requests fail


def test_a_run_whose_every_request_failed_exits_1_quickly_with_the_reason(tmp_path):
    port = closed_port()
    # default retries and backoff: before, each input waited out 6 retries and the run exited 0
    proc, seconds = cli(tmp_path, "run", "--limit", "40", "--concurrency", "4",
                        "--base-url", f"http://127.0.0.1:{port}/v1")
    err = proc.stderr.strip()
    assert proc.returncode == 1, err
    assert seconds < 15
    err = err.splitlines()[-1]  # the lines before it are the progress bar's
    assert err.startswith("stepdistill: error: every teacher request failed")
    assert f"cannot connect to http://127.0.0.1:{port}/v1" in err
    assert "teacher.base_url" in err and "running" in err and "OPENAI_API_KEY" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # written before the error
    assert summary["generated"] == 0 and 0 < summary["failed"] <= 4  # the first requests, then no more sent
    assert summary["not_requested"] == 40 - summary["failed"]
    assert summary["failure_reasons"] == {f"cannot connect to http://127.0.0.1:{port}/v1": summary["failed"]}
    assert "no teacher server could be reached" in summary["usage"]["stopped"]
    assert json.loads((tmp_path / "run" / "env.json").read_text())["status"] == "failed"


def test_a_run_with_many_failed_requests_completes_and_says_so(tmp_path):
    printed = []
    with FakeOpenAIServer(right_answer) as srv:
        srv.inject("503", times=3)  # 3 of 10 inputs fail for good (max_retries 0)
        s = api.annotate(cfg(srv.url, n=10, concurrency=1), tmp_path / "run", store_path=tmp_path / "s.sqlite",
                         echo=printed.append)
    assert (s["generated"], s["failed"], s["failure_reasons"]) == (7, 3, {"HTTP 503": 3})
    warning = [line for line in printed if line.startswith("WARNING:")]
    assert warning == [next(line for line in printed if "3 of 10 teacher requests failed (30%): HTTP 503: 3" in line)]
    assert json.loads((tmp_path / "run" / "env.json").read_text())["status"] == "done"
