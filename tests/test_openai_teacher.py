"""The openai teacher against a real HTTP server on 127.0.0.1 that injects faults on demand.

Every test asserts outcomes counted at the server or read from the store: each input ends
annotated or failed with its reason, retries wait what they should, the budget holds, and a
killed run resumes without asking the server anything twice.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from stepdistill import annotation, api
from stepdistill.config import AnnotateRun
from stepdistill.errors import StepDistillError
from stepdistill.store import AnnotationStore
from stepdistill.tasks import get_task
from stepdistill.testing.openai_server import FakeOpenAIServer

TASK = get_task("quickstart")
EXAMPLES = TASK.load("train")
GOLD = {e.input: e.label for e in EXAMPLES}


def question(prompt: str) -> str:
    """The question a few-shot prompt ends with."""
    return prompt.rsplit("Q: ", 1)[1].split("\nA:")[0].strip()


def right_answer(prompt: str, body: dict) -> str:
    return f"Let me work it out step by step. The answer is {GOLD[question(prompt)]}."


@pytest.fixture
def server():
    with FakeOpenAIServer(right_answer) as srv:
        yield srv


def cfg(srv, n=4, **teacher):
    t = {"kind": "openai", "base_url": srv.url, "model": "fake-model", "concurrency": 4, "timeout": 5,
         "backoff": 0.05, "backoff_max": 0.2, "sampling": {"max_new_tokens": 64}}
    verify = teacher.pop("verify", {})
    t.update(teacher)
    return {"task": {"name": "quickstart"}, "split": "train", "limit": n, "teacher": t, "verify": verify}


def run(srv, tmp_path, name="a", n=4, **teacher):
    return api.annotate(cfg(srv, n, **teacher), tmp_path / name, store_path=tmp_path / "store.sqlite", echo=lambda _: None)


def rows(tmp_path, name="a"):
    return [json.loads(line) for line in (tmp_path / name / "annotations.jsonl").read_text().splitlines()]


def arrivals(srv, prompt_part):
    return [r["t"] for r in srv.log if prompt_part in r["prompt"]]


def test_annotates_every_input_and_counts_tokens_and_cost(server, tmp_path):
    s = run(server, tmp_path, price={"prompt": 1.0, "completion": 2.0})
    assert (s["n"], s["kept"], s["teacher_accuracy"]) == (4, 4, 1.0)
    u = s["usage"]
    reported = [r["body"] for r in server.log]
    assert u["requests"] == 4 and u["retries"] == 0 and len(reported) == 4
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
    assert u["cost_usd"] == pytest.approx((u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0) / 1e6)
    assert all(r["completion"].endswith(f"The answer is {r['gold']}.") for r in rows(tmp_path))
    # chat endpoint by default: the few-shot prompt as one user message, the task's stop strings sent
    body = reported[0]
    assert server.log[0]["path"].endswith("/chat/completions")
    assert body["messages"][0]["role"] == "user" and body["max_tokens"] == 64 and body["stop"]
    assert run(server, tmp_path, "b")["generated"] == 0 and len(server.log) == 4  # the store answers a rerun


def test_completions_endpoint_sends_the_raw_prompt(server, tmp_path):
    run(server, tmp_path, n=1, endpoint="completions")
    assert server.log[0]["path"].endswith("/v1/completions") and "prompt" in server.log[0]["body"]


@pytest.mark.parametrize("fault", ["500", "502", "reset", "malformed", "empty"])
def test_transient_faults_are_retried_until_answered(server, tmp_path, fault):
    target = EXAMPLES[1].input
    server.inject(fault, times=2, match=target)
    s = run(server, tmp_path)
    assert s["kept"] == 4 and s["failed"] == 0
    assert len(arrivals(server, target)) == 3 and s["usage"]["retries"] == 2
    t = arrivals(server, target)
    # exponential backoff with jitter: [0.025, 0.05] s, then [0.05, 0.1] s (plus scheduling)
    assert 0.025 <= t[1] - t[0] < 1.0 and 0.05 <= t[2] - t[1] < 1.0


def test_429_waits_for_retry_after(server, tmp_path):
    target = EXAMPLES[0].input
    server.inject("429", match=target, retry_after=0.6)
    s = run(server, tmp_path)
    t = arrivals(server, target)
    assert s["kept"] == 4 and len(t) == 2 and t[1] - t[0] >= 0.6


def test_429_with_an_http_date_is_honoured(server, tmp_path):
    from email.utils import formatdate

    target = EXAMPLES[0].input
    server.inject("429", match=target, retry_after=formatdate(time.time() + 2, usegmt=True))
    run(server, tmp_path, n=1)
    t = arrivals(server, target)
    assert len(t) == 2 and t[1] - t[0] >= 0.9  # HTTP dates have 1 s resolution


def test_a_reply_slower_than_the_timeout_is_abandoned_and_retried(server, tmp_path):
    target = EXAMPLES[2].input
    server.inject("slow", match=target, delay=2.0)
    t0 = time.monotonic()
    s = run(server, tmp_path, timeout=0.5)
    assert s["kept"] == 4 and len(arrivals(server, target)) == 2
    assert time.monotonic() - t0 < 2.0  # did not wait for the slow reply


def test_truncated_completion_is_stored_and_reported(server, tmp_path):
    server.inject("truncated", match=EXAMPLES[0].input)
    s = run(server, tmp_path)
    assert s["truncated"] == 1 and s["generated"] == 4
    assert s["unparsed_reasons"]  # the cut-off answer did not parse, and says so


def test_a_permanently_failing_input_is_recorded_with_its_reason_then_retried_on_rerun(server, tmp_path):
    target = EXAMPLES[3].input
    server.inject("503", times=3, match=target)  # every attempt of this run
    s = run(server, tmp_path, max_retries=2)
    assert (s["kept"], s["failed"], s["dropped_reasons"]) == (3, 1, {"teacher failed": 1})
    row = next(r for r in rows(tmp_path) if r["input"] == target)
    assert row["completion"] is None and "failed after 3 attempts: HTTP 503" in row["error"]
    store = AnnotationStore(tmp_path / "store.sqlite")
    assert len(store) == 3 and len(store.failures([row_key for row_key in _all_keys(tmp_path)])) == 1
    store.close()
    before = len(server.log)
    s2 = run(server, tmp_path, "b", max_retries=2)
    assert s2["kept"] == 4 and s2["generated"] == 1 and len(server.log) == before + 1


def _all_keys(tmp_path):
    db = sqlite3.connect(tmp_path / "store.sqlite")
    return [k for (k,) in db.execute("SELECT key FROM failures UNION SELECT key FROM completions")]


def test_a_400_fails_that_input_only_without_retrying(server, tmp_path):
    target = EXAMPLES[0].input
    server.inject("400", match=target)
    s = run(server, tmp_path)
    assert s["kept"] == 3 and len(arrivals(server, target)) == 1
    assert "HTTP 400" in next(r for r in rows(tmp_path) if r["input"] == target)["error"]


def test_a_refused_key_stops_the_run_with_a_clear_error_that_does_not_leak_the_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-secret-123")
    server.inject("401")
    with pytest.raises(StepDistillError, match=r"API key was refused.*\$MY_TEACHER_KEY") as e:
        run(server, tmp_path, api_key_env="MY_TEACHER_KEY")
    assert "sk-secret-123" not in str(e.value)
    for f in (tmp_path / "a").rglob("*"):
        if f.is_file():
            assert "sk-secret-123" not in f.read_text(errors="replace"), f


def test_the_hosted_api_without_a_key_is_refused_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    c = cfg(type("S", (), {"url": None}), api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(StepDistillError, match="needs an API key: export NO_SUCH_KEY_VAR"):
        api.annotate(c, tmp_path / "a", store_path=tmp_path / "s.sqlite", echo=lambda _: None)


def test_requests_in_flight_are_bounded_by_concurrency(server, tmp_path):
    server.hold()
    t = threading.Thread(target=run, args=(server, tmp_path), kwargs={"n": 12, "concurrency": 3})
    t.start()
    time.sleep(1.0)
    in_flight = len(server.log)
    server.release()
    t.join(30)
    assert in_flight == 3 and len(server.log) == 12


@pytest.mark.parametrize("budget", [{"tokens": 3000}, {"usd": 0.003}])
def test_the_budget_is_never_exceeded_and_the_run_stops_cleanly(server, tmp_path, budget):
    s = run(server, tmp_path, n=12, budget=budget, price={"prompt": 1.0, "completion": 1.0})
    u = s["usage"]
    limit = budget.get("tokens") or budget["usd"] * 1e6  # at $1/M tokens, usd * 1e6 = tokens
    spent_at_server = sum(_server_tokens(server))
    assert 0 < s["generated"] < 12 and spent_at_server <= limit
    assert u["prompt_tokens"] + u["completion_tokens"] == spent_at_server
    assert "budget" in u["stopped"] and u["not_requested"] == s["not_requested"] == 12 - s["generated"]
    assert s["failed"] == 0  # skipped by the budget is not a failure
    assert s["dropped_reasons"] == {"teacher failed": 12 - s["generated"]}
    assert all("not requested" in r["error"] for r in rows(tmp_path) if r["completion"] is None)


def test_an_attempt_that_times_out_is_charged_its_worst_case(server, tmp_path):
    """The server may still generate (and bill) a reply we stopped waiting for: the budget
    counts the attempt's reservation, so it stays a bound on what was really spent."""
    server.inject("slow", match=EXAMPLES[0].input, delay=1.5)
    s = run(server, tmp_path, n=1, timeout=0.5, price={"prompt": 1.0, "completion": 1.0})
    u = s["usage"]
    answered = sum(_server_tokens(server))
    prompt_bytes = len(server.log[0]["prompt"].encode())
    assert u["prompt_tokens"] + u["completion_tokens"] >= answered + prompt_bytes + 64  # the lost attempt, in full


def _server_tokens(srv):
    for r in srv.log:
        if r["answered"]:
            prompt_words = len(r["prompt"].split())
            yield prompt_words + len(right_answer(r["prompt"], {}).split())


def _vote_responder(prompt, body):
    """Sample i answers by its seed: questions 0-1 get 2 right + 1 wrong, question 2 three different answers."""
    q, seed = question(prompt), body.get("seed", 0)
    gold = GOLD[q]
    if q == EXAMPLES[2].input:
        return f"Hmm. The answer is ({seed} + 100)."
    return f"Step by step. The answer is {gold}." if seed != 1 else "Oops. The answer is (1 + 1000)."


def test_self_consistency_votes_and_keeps_rationales_that_agree(tmp_path):
    with FakeOpenAIServer(_vote_responder) as srv:
        s = run(srv, tmp_path, n=3, sampling={"temperature": 0.7, "max_new_tokens": 64},
                verify={"samples": 3, "against": "majority"})
    assert len(srv.log) == 9 and {r["body"]["seed"] for r in srv.log} == {0, 1, 2}
    r = rows(tmp_path)
    assert r[0]["kept"] and r[0]["agreement"] == pytest.approx(2 / 3) and r[0]["chosen"] == 0
    assert sorted(r[0]["votes"].values()) == [1, 2] and len(r[0]["samples"]) == 3
    assert not r[2]["kept"] and r[2]["drop_reason"] == "no clear majority"
    assert s["dropped_reasons"] == {"no clear majority": 1} and s["mean_agreement"] == pytest.approx((2 / 3 * 2 + 1 / 3) / 3, abs=1e-3)
    assert s["teacher_accuracy"] == pytest.approx(2 / 3)  # the majority vote is right on inputs 0 and 1


def test_verification_against_gold_keeps_only_a_right_rationale(tmp_path):
    with FakeOpenAIServer(_vote_responder) as srv:
        run(srv, tmp_path, n=3, sampling={"temperature": 0.7, "max_new_tokens": 64}, verify={"samples": 3})
    r = rows(tmp_path)  # auto = gold here: inputs 0 and 1 keep a right sample, input 2 has none
    assert [x["kept"] for x in r] == [True, True, False] and r[2]["drop_reason"] == "disagrees with gold"
    assert all(x["label"] == x["gold"] or not x["kept"] for x in r)


def test_greedy_self_consistency_is_refused():
    from stepdistill.config import AnnotateRun, build
    from stepdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="temperature > 0"):
        build(AnnotateRun, {"task": {"name": "quickstart"}, "verify": {"samples": 5}})


# ---------------------------------------------------------------- processes: kill -9, two writers


def _cli(srv, tmp_path, out, *extra, n=30):
    env = {**os.environ, "STEPDISTILL_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "stepdistill.cli", "annotate", "--task", "quickstart", "--split", "train",
           "--limit", str(n), "--teacher", "openai", "--base-url", srv.url, "--model", "fake-model",
           "--concurrency", "4", "--store", str(tmp_path / "store.sqlite"), "--out", str(tmp_path / out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_requests_nothing_twice(server, tmp_path):
    proc = _cli(server, tmp_path, "a")
    assert server.wait_answered(10, timeout=60)
    server.hold()  # later requests wait unanswered, so the kill lands with requests in flight
    time.sleep(0.5)  # the answered ones are committed by now
    answered_before = sum(server.answered().values())
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    server.release()
    assert len(AnnotationStore(tmp_path / "store.sqlite")) == answered_before  # nothing answered was lost

    proc = _cli(server, tmp_path, "a", "--resume")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert max(server.answered().values()) == 1 and len(server.answered()) == 30  # zero duplicates
    assert len(AnnotationStore(tmp_path / "store.sqlite")) == 30
    assert len(rows(tmp_path)) == 30 and all(r["completion"] for r in rows(tmp_path))


def test_two_processes_on_one_store_do_not_corrupt_it(server, tmp_path):
    procs = [_cli(server, tmp_path, name, n=40) for name in ("a", "b")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    db = sqlite3.connect(tmp_path / "store.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM completions").fetchone() == (40, 40)
    a, b = rows(tmp_path, "a"), rows(tmp_path, "b")
    assert [r["completion"] for r in a] == [r["completion"] for r in b]  # both read the one stored answer


# ---------------------------------------------------------------- export


def test_store_exports_to_jsonl_and_a_dataset(server, tmp_path):
    from stepdistill.cli import run as cli

    run(server, tmp_path)
    assert cli(["store", "export", "--store", str(tmp_path / "store.sqlite"), "--out", str(tmp_path / "x.jsonl")]) == 0
    exported = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert len(exported) == 4 and {"key", "prompt", "completion", "teacher"} <= set(exported[0])
    assert exported[0]["teacher"]["kind"] == "openai"
    assert cli(["store", "export", "--store", str(tmp_path / "store.sqlite"), "--format", "dataset",
                "--out", str(tmp_path / "ds")]) == 0
    from datasets import load_from_disk

    ds = load_from_disk(str(tmp_path / "ds"))
    assert len(ds) == 4 and set(ds["completion"]) == {r["completion"] for r in exported}
    with pytest.raises(StepDistillError, match="exists"):
        cli(["store", "export", "--store", str(tmp_path / "store.sqlite"), "--out", str(tmp_path / "x.jsonl")])


def test_large_runs_are_prepared_a_chunk_at_a_time(tmp_path, monkeypatch):
    """Prompts, keys and teacher calls for a chunk of inputs at a time (bounded memory on a
    dataset of any size); rows still come out in input order, each with its own answer."""
    import stepdistill.teachers.openai as openai_teacher

    monkeypatch.setattr(annotation, "CHUNK_REQUESTS", 4)  # k = 2: two inputs per chunk
    sizes = []
    real = openai_teacher.OpenAITeacher.generate_ready

    def spy(self, requests):
        sizes.append(len(requests))
        return real(self, requests)

    monkeypatch.setattr(openai_teacher.OpenAITeacher, "generate_ready", spy)
    with FakeOpenAIServer(_vote_responder) as srv:
        s = run(srv, tmp_path, n=5, sampling={"temperature": 0.7, "max_new_tokens": 64},
                verify={"samples": 2, "against": "gold"})
    assert sizes == [4, 4, 2] and s["generated"] == 10
    r = rows(tmp_path)
    assert [x["input"] for x in r] == [e.input for e in EXAMPLES[:5]]
    store = AnnotationStore(tmp_path / "store.sqlite")
    prompt_of = {rec["key"]: rec["prompt"] for rec in store.rows()}
    store.close()
    assert all(question(prompt_of[smp["key"]]) == x["input"] for x in r for smp in x["samples"])


# --- scale-out: replicas with health, sharded annotation ----------------------------------------


def _questions(n):
    from stepdistill.tasks import get_task

    return get_task("quickstart").load("train")[:n]


def _pool(tmp_path, n):
    qs = _questions(n)
    f = tmp_path / "pool.jsonl"
    f.write_text("".join(json.dumps({"input": e.input, "label": e.label}) + "\n" for e in qs))
    return f, {e.input: e.label for e in qs}


def _answerer(gold):
    def answer(prompt, body):
        q = prompt.rsplit("Q: ", 1)[1].split("\nA:")[0].strip()
        return f"Work it out. The answer is {gold[q]}."
    return answer


def test_replicas_share_the_work_and_a_dead_one_is_taken_out(tmp_path):
    data, gold = _pool(tmp_path, 40)
    with FakeOpenAIServer(_answerer(gold), latency=0.05) as a, FakeOpenAIServer(_answerer(gold), latency=0.05) as b:
        killer = threading.Thread(target=lambda: (b.wait_answered(6), b.stop()))
        killer.start()
        summary = api.annotate({"task": {"name": "svamp", "path": str(data)}, "split": "train",
                                "teacher": {"kind": "openai", "base_url": a.url, "replicas": [b.url], "model": "m",
                                            "concurrency": 2, "backoff": 0.01, "replica_cooldown": 60}},
                               tmp_path / "run", store_path=tmp_path / "s.sqlite", echo=lambda _: None)
        killer.join()
        answered = a.answered() + b.answered()
    assert summary["n"] == summary["generated"] == 40 and summary["failed"] == 0
    assert sum(answered.values()) == 40 and set(answered.values()) == {1}  # every input answered exactly once
    assert sum(b.answered().values()) >= 6 and sum(a.answered().values()) >= 20  # both served; a took over
    assert summary["usage"]["replicas_taken_out"] == 1


def test_sharded_annotation_covers_every_input_once(tmp_path):
    data, gold = _pool(tmp_path, 30)
    store = tmp_path / "s.sqlite"
    with FakeOpenAIServer(_answerer(gold)) as srv:
        cfg = {"task": {"name": "svamp", "path": str(data)}, "split": "train",
               "teacher": {"kind": "openai", "base_url": srv.url, "model": "m"}}
        shards = [api.annotate({**cfg, "shard": f"{i}/3"}, tmp_path / f"shard{i}", store_path=store,
                               echo=lambda _: None) for i in range(3)]
        whole = api.annotate(cfg, tmp_path / "all", store_path=store, echo=lambda _: None)
        answered = srv.answered()
    assert sum(s["n"] for s in shards) == 30 and all(s["n"] > 0 for s in shards)
    ids = [json.loads(x)["id"] for i in range(3) for x in (tmp_path / f"shard{i}" / "annotations.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"train-{i}" for i in range(30))  # disjoint, and together all of them
    assert sum(answered.values()) == 30 and set(answered.values()) == {1}
    assert whole["generated"] == 0 and whole["from_store"] == 30 and whole["n"] == 30  # collected at no cost


def test_bad_shard_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="shard must be I/N"):
        AnnotateRun(task={"name": "svamp"}, shard="first half")
    with pytest.raises(ValueError, match="need 0 <= I < N"):
        AnnotateRun(task={"name": "svamp"}, shard="3/3")


# --- several rationales per input (SCoTD): method.rationales_per_input ------------------------


def _many_rationales(prompt, body):
    """Sample i of every question: seeds 0, 2 and 3 right with their own reasoning (3 repeats 0's),
    seed 1 wrong."""
    q, seed = question(prompt), body.get("seed", 0)
    if seed == 1:
        return "Oops. The answer is (1 + 1000)."
    return f"Reasoning number {seed % 3}. The answer is {GOLD[q]}."


def test_several_rationales_per_input_become_rows_of_their_own(tmp_path):
    from stepdistill.config import MethodConfig
    from stepdistill.methods import get_method
    from stepdistill.store import read_annotations

    with FakeOpenAIServer(_many_rationales) as srv:
        run(srv, tmp_path, n=3, sampling={"temperature": 0.7, "max_new_tokens": 64}, verify={"samples": 4})
    ann = read_annotations(tmp_path / "a", TASK, "train", EXAMPLES[:3])
    # the kept rationale, then the other right samples' distinct ones; the wrong sample and the repeat are not others
    assert all(ann[e.id].rationale == "Reasoning number 0." and ann[e.id].others == ("Reasoning number 2.",)
               for e in EXAMPLES[:3])
    for name in ("step-by-step", "label-rationale"):
        one = get_method(MethodConfig(name=name)).records(EXAMPLES[:3], ann)
        three = get_method(MethodConfig(name=name, rationales_per_input=3)).records(EXAMPLES[:3], ann)
        assert len(one.records) == 3 and len(three.records) == 6 and three.counts["extra_rationales"] == 3
        assert [(r.id, r.label, r.rationale) for r in three.records[:2]] == [
            (EXAMPLES[0].id, EXAMPLES[0].label, "Reasoning number 0."),
            (EXAMPLES[0].id, EXAMPLES[0].label, "Reasoning number 2.")]


def test_several_rationales_are_read_from_runs_that_did_not_record_them_per_sample(tmp_path):
    from stepdistill.store import read_annotations

    with FakeOpenAIServer(_many_rationales) as srv:
        run(srv, tmp_path, n=2, sampling={"temperature": 0.7, "max_new_tokens": 64}, verify={"samples": 4})
    path = tmp_path / "a" / "annotations.jsonl"
    old = [json.loads(line) for line in path.read_text().splitlines()]
    for row in old:  # as annotate wrote them before sample rows carried their rationale
        for s in row["samples"]:
            s.pop("rationale")
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    ann = read_annotations(tmp_path / "a", TASK, "train", EXAMPLES[:2])
    assert [ann[e.id].others for e in EXAMPLES[:2]] == [("Reasoning number 2.",)] * 2


def test_asking_for_several_rationales_from_one_sample_per_input_is_a_clear_error(tmp_path, server):
    from stepdistill.config import MethodConfig
    from stepdistill.methods import get_method
    from stepdistill.store import read_annotations

    run(server, tmp_path, n=3)
    ann = read_annotations(tmp_path / "a", TASK, "train", EXAMPLES[:3])
    with pytest.raises(StepDistillError, match="one rationale per input.*verify.samples"):
        get_method(MethodConfig(name="step-by-step", rationales_per_input=2)).records(EXAMPLES[:3], ann)


# --- chat endpoints: few-shot exemplars as turns ----------------------------------------------


def test_a_chat_teacher_gets_the_exemplars_as_user_and_assistant_turns(server, tmp_path):
    run(server, tmp_path, n=1)
    (body,) = [r["body"] for r in server.log]
    roles = [m["role"] for m in body["messages"]]
    assert roles[-1] == "user" and roles[:-1] == ["user", "assistant"] * (len(roles) // 2)
    prompt = TASK.teacher_prompt(EXAMPLES[0])
    # the turns hold the prompt's text: each exemplar's question, its answer, then the input
    m = body["messages"]
    shots = [m[i]["content"] + " " + m[i + 1]["content"] for i in range(0, len(m) - 1, 2)]
    assert "\n\n".join([*shots, m[-1]["content"]]) == prompt
    assert body["messages"][-1]["content"] == prompt.rsplit("\n\n", 1)[1]


def test_one_message_chat_format_sends_the_prompt_as_before_under_another_store_key(server, tmp_path):
    from stepdistill.config import TeacherConfig
    from stepdistill.teachers import make_teacher

    run(server, tmp_path, n=1, chat_format="one-message")
    (body,) = [r["body"] for r in server.log]
    assert body["messages"] == [{"role": "user", "content": TASK.teacher_prompt(EXAMPLES[0])}]
    turns = make_teacher(TeacherConfig(**cfg(server, 1)["teacher"]), TASK, "train", None).identity()
    one = make_teacher(TeacherConfig(**cfg(server, 1, chat_format="one-message")["teacher"]), TASK, "train", None).identity()
    assert turns != one and turns["chat_format"] == "turns"  # a stored one-message answer is not reused for turns
