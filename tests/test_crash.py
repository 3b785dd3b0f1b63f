"""Crashes and failed writes.

kill -9 lands at chosen points of `annotate` and `train` (the child process stops itself at
the point and the test SIGKILLs it: the kill is real, only its timing is arranged); the rerun
must end exactly where an uninterrupted run ends. A write that fails (a size-limited file, a
full SQLite store, a read-only folder) must give one clear error and leave what was written
before intact.

Root ignores permission bits, so where the tests run as root a read-only folder is simulated
by monkeypatching; size limits are real (RLIMIT_FSIZE: the kernel fails the write with EFBIG,
as it fails one with ENOSPC on a full disk), and so is SQLite's "database or disk is full"
(PRAGMA max_page_count caps the file, the write path is SQLite's own).
"""

import contextlib
import errno
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from stepdistill import cli, runs
from stepdistill.config import MethodConfig, TrainingConfig
from stepdistill.errors import StepDistillError
from stepdistill.methods import get_method
from stepdistill.store import AnnotationStore
from stepdistill.testing.openai_server import FakeOpenAIServer
from stepdistill.methods.co_distill import TEACHER_DIR
from stepdistill.training import SEAL, find_checkpoints, fit
from stepdistill.training.checkpoints import is_sealed, save_folder
from test_kd_training import save_teacher
from tiny_models import FakeTask, examples, llama_student

# ---------------------------------------------------------------- the child and its kill points

# Runs the CLI with one hook per kill point. CRASH_PAUSE names where to stop:
#   step:N          before optimizer step N (steps 1..N-1 are done and logged)
#   save:N          inside checkpoint-N, after its weights and before its optimizer and state
#   replace:NAME    after a run file's temp copy is written, before it is renamed to NAME (or to a
#                   path ending in NAME, e.g. eval/metrics.json)
# There the child writes CRASH_FLAG and waits to be killed. CRASH_BATCHES, when set, gets one
# JSON line per optimizer step with the token ids of its batch (the data order).
CHILD = r"""
import json, os, sys, time
from pathlib import Path

kind, _, arg = os.environ.get("CRASH_PAUSE", "").partition(":")
flag, batches = Path(os.environ["CRASH_FLAG"]), os.environ.get("CRASH_BATCHES")

def stop_here():
    flag.write_text(f"{kind}:{arg}")
    time.sleep(600)

real_replace = os.replace

def replace(src, dst, *a, **k):
    if kind == "replace" and str(dst).endswith(os.sep + arg):  # a name, or a path's last parts
        stop_here()
    return real_replace(src, dst, *a, **k)

os.replace = replace

if sys.argv[1] in ("train", "sweep"):  # annotate never imports torch: its children start in a second or two
    import torch
    torch.set_num_threads(1)  # as the tests' own process: same float reductions, same weights
    from transformers import Trainer

    real_step, real_opt = Trainer.training_step, Trainer._save_optimizer_and_scheduler

    def training_step(self, model, inputs, *a, **k):
        step = self.state.global_step + 1
        if kind == "step" and step == int(arg):
            stop_here()
        if batches:
            with open(batches, "a") as f:
                f.write(json.dumps({"step": step, "ids": inputs["input_ids"].tolist()}) + "\n")
        return real_step(self, model, inputs, *a, **k)

    def save_optimizer(self, output_dir):
        if kind == "save" and self.state.global_step == int(arg):
            stop_here()
        return real_opt(self, output_dir)

    Trainer.training_step, Trainer._save_optimizer_and_scheduler = training_step, save_optimizer

from stepdistill import cli

cli.main(sys.argv[1:])
"""


def _spawn(tmp_path: Path, argv: list[str], pause: str = "", batches: Path | None = None) -> subprocess.Popen:
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD)
    flag = tmp_path / "paused"
    flag.unlink(missing_ok=True)
    env = {**os.environ, "STEPDISTILL_HOME": str(tmp_path / "home"), "CRASH_PAUSE": pause, "CRASH_FLAG": str(flag),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if batches is not None:
        env["CRASH_BATCHES"] = str(batches)
    with (tmp_path / "child.log").open("a") as log:
        log.write(f"\n$ {' '.join(argv)}  [pause {pause or '-'}]\n")
        log.flush()
        return subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=log, stderr=log, cwd=tmp_path)


def _kill_when_paused(proc: subprocess.Popen, tmp_path: Path, timeout: float = 120) -> None:
    flag, deadline = tmp_path / "paused", time.monotonic() + timeout
    while not flag.exists():
        assert proc.poll() is None, f"child exited ({proc.returncode}) before its kill point:\n{_child_log(tmp_path)}"
        assert time.monotonic() < deadline, f"child never reached its kill point:\n{_child_log(tmp_path)}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def _finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 180) -> None:
    assert proc.wait(timeout) == 0, _child_log(tmp_path)


def _child_log(tmp_path: Path) -> str:
    return (tmp_path / "child.log").read_text()[-4000:]


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(f".*{runs.TMP_SUFFIX}")]


# ---------------------------------------------------------------- train: kill -9, --resume

def _train_argv(tmp_path: Path, out: str) -> list[str]:
    """`stepdistill train` of a tiny saved llama on 16 word problems: 9 steps, a checkpoint every 3."""
    student = tmp_path / "student"
    if not student.exists():
        s = llama_student(seed=0)
        s.model.save_pretrained(student)
        s.tokenizer.save_pretrained(student)
        (tmp_path / "words.jsonl").write_text(
            "".join(json.dumps({"text": e.input, "label": e.label}) + "\n" for e in examples(16)))
        (tmp_path / "words.yaml").write_text(
            "name: words\ninputs: [text]\nlabel: label\nlabel_kind: classes\nclasses: [animal, plant]\n")
    return ["train", "--task", "generic", "--spec", "words.yaml", "--data", "words.jsonl", "--student", "student",
            "--method", "standard", "--max-steps", "9", "--batch-size", "4", "--lr", "1e-2",
            "--set", "training.eval_steps=3", "--set", "training.logging_steps=1", "--set", "training.val_size=2",
            "--set", "training.val_max_new_tokens=2", "--out", out]


def _checkpoint_names(root: Path) -> list[str]:
    return sorted((p.name for p in root.iterdir() if p.is_dir()), key=lambda n: int(n.split("-")[1]))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def _batches(path: Path) -> list[tuple[int, list]]:
    """(step, its batch) for every step any of the processes ran (the redone ones repeat)."""
    return [(r["step"], r["ids"]) for r in map(json.loads, path.read_text().splitlines())]


def test_train_killed_between_and_inside_checkpoints_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    run, ckpts, batches = tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "batches.jsonl"

    # 1. killed between checkpoints: checkpoint-3 is sealed, step 4 done and logged, step 5 about to run
    _kill_when_paused(_spawn(tmp_path, _train_argv(tmp_path, "run"), "step:5", batches), tmp_path)
    assert _checkpoint_names(ckpts) == ["checkpoint-3"]
    assert [s for s, _ in _losses(run)] == [1, 2, 3, 4]

    # 2. resumed, then killed inside checkpoint-6: its weights are written, its optimizer and state are not
    _kill_when_paused(_spawn(tmp_path, _train_argv(tmp_path, "run") + ["--resume"], "save:6", batches), tmp_path)
    half = ckpts / "checkpoint-6"
    assert (half / "model.safetensors").is_file() and not (half / "trainer_state.json").exists()
    assert get_last_checkpoint(str(ckpts)) == str(half)  # what Trainer alone would resume from (and crash on)
    assert find_checkpoints(ckpts) == (ckpts / "checkpoint-3", [half])

    # 3. resumed to the end
    _finish(_spawn(tmp_path, _train_argv(tmp_path, "run") + ["--resume"], batches=batches), tmp_path)

    # the same training, uninterrupted, in this process (one thread, as the child)
    ref_batches: dict[int, list] = {}
    real_step = Trainer.training_step

    def record(self, model, inputs, *a, **k):
        ref_batches[self.state.global_step + 1] = inputs["input_ids"].tolist()
        return real_step(self, model, inputs, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", record)
    replaced: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d, *a, **k: (replaced.append(Path(d).name), real_replace(s, d, *a, **k)))
    monkeypatch.chdir(tmp_path)
    assert cli.run(_train_argv(tmp_path, "ref")) == 0
    ref = tmp_path / "ref"
    # every run file and the checkpoint seals were written by rename (write, fsync, rename)
    assert {"config.yaml", "env.json", "metrics.json", SEAL} <= set(replaced)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 9 and json.loads((run / "env.json").read_text())["status"] == "done"
    # the data order: every step any process ran got the batch the uninterrupted run got at that step
    seen = _batches(batches)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 4, 5, 6, 4, 5, 6, 7, 8, 9] and sorted(ref_batches) == list(range(1, 10))
    assert all(ids == ref_batches[step] for step, ids in seen)
    assert [s for s, _ in _losses(run)] == list(range(1, 10))  # each step logged once, the redone ones too
    assert [v for _, v in _losses(run)] == pytest.approx([v for _, v in _losses(ref)], abs=1e-5)
    ours, theirs = _weights(run), _weights(ref)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit for bit
    log = (run / "log.txt").read_text()
    resumed = [line for line in log.splitlines() if "resuming from" in line]
    assert len(resumed) == 2 and all(line.endswith("checkpoint-3 (step 3)") for line in resumed), resumed
    assert "checkpoint-6: incomplete" in log  # removed before the second resume
    assert _checkpoint_names(ckpts) == ["checkpoint-6", "checkpoint-9"]
    assert all(is_sealed(ckpts / name) for name in _checkpoint_names(ckpts)) and not _temp_files(run)


def test_co_distillation_killed_resumes_both_models_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Co-distillation trains two models: kill -9 after its step-3 checkpoint, --resume, and both
    the student and the teacher end bit for bit where an uninterrupted run ends (the teacher's
    weights and Adam moments come back from the checkpoint with the student's)."""
    save_teacher("llama", tmp_path / "teacher", seed=1)

    def argv(out):
        return [*_train_argv(tmp_path, out), "--method", "co-distill", "--set", "method.kd.teacher=teacher",
                "--set", "method.kd.warmup_steps=2"]

    _kill_when_paused(_spawn(tmp_path, argv("run"), "step:5"), tmp_path)
    assert _checkpoint_names(tmp_path / "run" / "checkpoints") == ["checkpoint-3"]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-3" / TEACHER_DIR / "model.safetensors").is_file()
    _finish(_spawn(tmp_path, argv("run") + ["--resume"]), tmp_path)
    monkeypatch.chdir(tmp_path)  # uninterrupted, in this process (one thread, as the child)
    assert cli.run(argv("ref")) == 0
    for folder in ("model", "teacher_model"):
        ours, theirs = (load_file(tmp_path / d / folder / "model.safetensors") for d in ("run", "ref"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), folder
    assert [v for _, v in _losses(tmp_path / "run")] == pytest.approx([v for _, v in _losses(tmp_path / "ref")], abs=1e-5)


def test_on_policy_distillation_killed_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """On-policy KD samples the student's own targets: kill -9 after the step-3 checkpoint,
    --resume, and the run ends bit for bit where an uninterrupted one ends (the coin and the
    samples are seeded by step, not by a random stream the kill would lose)."""
    save_teacher("llama", tmp_path / "teacher", seed=1)

    def argv(out):
        return [*_train_argv(tmp_path, out), "--method", "on-policy", "--set", "method.kd.teacher=teacher",
                "--set", "method.kd.kind=jsd", "--set", "method.kd.lmbda=0.5"]

    _kill_when_paused(_spawn(tmp_path, argv("run"), "step:5"), tmp_path)
    assert _checkpoint_names(tmp_path / "run" / "checkpoints") == ["checkpoint-3"]
    _finish(_spawn(tmp_path, argv("run") + ["--resume"]), tmp_path)
    monkeypatch.chdir(tmp_path)  # uninterrupted, in this process (one thread, as the child)
    assert cli.run(argv("ref")) == 0
    ours, theirs = _weights(tmp_path / "run"), _weights(tmp_path / "ref")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [v for _, v in _losses(tmp_path / "run")] == pytest.approx([v for _, v in _losses(tmp_path / "ref")], abs=1e-5)
    logged = [json.loads(x) for x in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    assert any(x.get("onpolicy_share", 0) > 0 for x in logged)  # it did sample


def _sweep_config(tmp_path: Path) -> Path:
    """A sweep of 2 seeds x 1 method on the tiny llama: 6 steps per cell, a checkpoint every 3."""
    import yaml

    _train_argv(tmp_path, "unused")  # the student, words.jsonl and words.yaml
    cfg = {"task": {"name": "generic", "spec": "words.yaml", "path": "words.jsonl"}, "methods": ["standard"],
           "students": ["student"], "seeds": [0, 1],
           "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "eval_steps": 3, "val_size": 2,
                        "val_max_new_tokens": 2, "logging_steps": 1, "bf16": False},
           "eval": {"split": "train", "limit": 6}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "sweep.yaml"


def test_sweep_killed_inside_cells_reruns_to_the_uninterrupted_results(tmp_path, monkeypatch):
    """kill -9 in the first cell's training (after its step-3 checkpoint) and again while the
    second cell's evaluation is written: the reruns resume the cell from its checkpoint and redo
    the evaluation; every cell ends with the weights and the accuracy of an uninterrupted sweep."""
    _sweep_config(tmp_path)
    argv = ["sweep", "--config", "sweep.yaml", "--out", "run"]
    _kill_when_paused(_spawn(tmp_path, argv, "step:5"), tmp_path)
    cells = tmp_path / "run" / "cells"
    (first,) = [c for c in cells.iterdir()]
    assert _checkpoint_names(first / "train" / "checkpoints") == ["checkpoint-3"]
    assert first.name.endswith("__s0")
    second = cells / (first.name[:-1] + "1")
    _kill_when_paused(_spawn(tmp_path, argv, f"replace:{second.name}/eval/metrics.json"), tmp_path)
    assert (first / "eval" / "metrics.json").is_file() and (second / "train" / "metrics.json").is_file()
    assert not (second / "eval" / "metrics.json").exists()
    _finish(_spawn(tmp_path, argv), tmp_path)
    assert "resuming from" in (first / "train" / "log.txt").read_text()

    monkeypatch.chdir(tmp_path)  # the same sweep, uninterrupted, in this process (one thread, as the child)
    assert cli.run(["sweep", "--config", "sweep.yaml", "--out", "ref"]) == 0
    ours, ref = (json.loads((tmp_path / d / "results.json").read_text())["cells"] for d in ("run", "ref"))
    assert [(c["cell"], c["status"], c["accuracy"]) for c in ours] == [(c["cell"], c["status"], c["accuracy"])
                                                                      for c in ref]
    for c in ref:
        a, b = (_weights(tmp_path / d / "cells" / c["cell"] / "train") for d in ("run", "ref"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), c["cell"]  # bit for bit
    assert not _temp_files(tmp_path / "run")


def test_failed_checkpoint_write_is_one_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A size-limited filesystem fails checkpoint-6 (real EFBIG from the kernel): checkpoint-3
    stays sealed and byte-identical, and --resume from it ends where an uninterrupted run ends."""
    method = MethodConfig(name="standard")
    exs = examples(16)
    records = get_method(method).records(exs, None).records
    cfg = TrainingConfig(max_steps=9, eval_steps=3, batch_size=4, learning_rate=1e-2, logging_steps=1)
    snapshot: dict[str, bytes] = {}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    class FillTheDisk(TrainerCallback):  # added after _SealCheckpoint, so it runs once checkpoint-3 is sealed
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                folder = Path(args.output_dir) / "checkpoint-3"
                snapshot.update({p.name: p.read_bytes() for p in folder.iterdir()})
                resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, hard))  # the model file alone is ~84 KB

    import stepdistill.training.fitting as fitting

    real_build = fitting.build_trainer

    def build(*a, **k):
        trainer = real_build(*a, **k)
        trainer.add_callback(FillTheDisk())
        return trainer

    run = tmp_path / "run"
    monkeypatch.setattr(fitting, "build_trainer", build)
    try:
        with pytest.raises(StepDistillError) as err:
            fit(llama_student(), method, cfg, records, exs[:4], FakeTask(), run, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    monkeypatch.setattr(fitting, "build_trainer", real_build)
    msg = str(err.value)
    assert "\n" not in msg and str(run / "checkpoints" / "checkpoint-6") in msg and "File too large" in msg
    assert "free disk space" in msg and "--resume" in msg and "continues from checkpoint-3" in msg
    ckpts = run / "checkpoints"
    assert _checkpoint_names(ckpts) == ["checkpoint-3"]  # the half-written one is gone
    assert is_sealed(ckpts / "checkpoint-3")
    assert {p.name: p.read_bytes() for p in (ckpts / "checkpoint-3").iterdir()} == snapshot

    m = fit(llama_student(), method, cfg, records, exs[:4], FakeTask(), run, resume=True, progress=False)
    ref = fit(llama_student(), method, cfg, records, exs[:4], FakeTask(), tmp_path / "ref", progress=False)
    assert m["steps"] == 9 and [s for s, _ in m["train_loss"]] == list(range(1, 10))
    assert [v for _, v in m["train_loss"]] == pytest.approx([v for _, v in ref["train_loss"]], abs=1e-5)
    ours, theirs = _weights(run), _weights(tmp_path / "ref")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_unsealed_checkpoints_are_never_resumed_from(tmp_path):
    """What a kill can leave in checkpoint-N, and which checkpoint resume picks."""
    from stepdistill.training import SEALS

    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"w" * 10)
        (root / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    # a run from before sealing (no SEALS file): Trainer's own last file decides
    (root / "checkpoint-9" / "trainer_state.json").write_text('{"global_st')  # cut short by a kill
    assert find_checkpoints(root) == (root / "checkpoint-6", [root / "checkpoint-9"])
    # sealing since step 3: a later checkpoint counts only with a seal whose every file has its size
    runs.write_json(root / SEALS, {"sealed_after": 3})
    (root / "checkpoint-9" / "trainer_state.json").write_text(json.dumps({"global_step": 9}))
    assert find_checkpoints(root) == (root / "checkpoint-3", [root / "checkpoint-6", root / "checkpoint-9"])
    runs.write_json(root / "checkpoint-6" / SEAL, {"step": 6, "files": {"model.safetensors": 10}})
    runs.write_json(root / "checkpoint-9" / SEAL, {"step": 9, "files": {"model.safetensors": 11}})
    assert find_checkpoints(root) == (root / "checkpoint-6", [root / "checkpoint-9"])
    (root / "checkpoint-6" / SEAL).write_text('{"step": 6, "fil')  # seals are written atomically; a torn one still fails
    assert find_checkpoints(root) == (root / "checkpoint-3", [root / "checkpoint-6", root / "checkpoint-9"])


# ---------------------------------------------------------------- annotate: kill -9, rerun

def _annotate_argv(srv: FakeOpenAIServer, tmp_path: Path, out: str, store: str = "store.sqlite", n: int = 30
                   ) -> list[str]:
    return ["annotate", "--task", "quickstart", "--split", "train", "--limit", str(n), "--teacher", "openai",
            "--base-url", srv.url, "--model", "fake-model", "--concurrency", "4",
            "--store", str(tmp_path / store), "--out", str(tmp_path / out)]


def _right_answer(prompt: str, body: dict) -> str:
    from stepdistill.tasks import get_task

    gold = {e.input: e.label for e in get_task("quickstart").load("train")}
    question = prompt.rsplit("Q: ", 1)[1].split("\nA:")[0].strip()
    return f"Let me work it out step by step. The answer is {gold[question]}."


@pytest.fixture
def server():
    with FakeOpenAIServer(_right_answer) as srv:
        yield srv


def test_annotate_killed_mid_generation_and_mid_write_reruns_to_the_same_annotations(server, tmp_path):
    run = tmp_path / "run"
    argv = _annotate_argv(server, tmp_path, "run")

    # 1. killed with requests in flight (10 answered and committed, the rest held by the server)
    proc = _spawn(tmp_path, argv)
    assert server.wait_answered(10, timeout=60)
    server.hold()
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    server.release()
    assert not (run / "annotations.jsonl").exists()

    # 2. rerun, killed once annotations.jsonl's temp copy is written, before its rename
    _kill_when_paused(_spawn(tmp_path, argv + ["--resume"], "replace:annotations.jsonl"), tmp_path)
    assert not (run / "annotations.jsonl").exists() and len(_temp_files(run)) == 1  # never half a file

    # 3. rerun, killed before summary.json's rename: the annotations are complete, the summary absent
    _kill_when_paused(_spawn(tmp_path, argv + ["--resume"], "replace:summary.json"), tmp_path)
    assert (run / "annotations.jsonl").is_file() and not (run / "summary.json").exists()

    # 4. rerun to the end
    _finish(_spawn(tmp_path, argv + ["--resume"]), tmp_path)
    assert len(server.answered()) == 30 and max(server.answered().values()) == 1  # nothing asked twice
    assert not _temp_files(run) and json.loads((run / "env.json").read_text())["status"] == "done"

    # the same annotation, uninterrupted (its own store: every completion asked for again)
    assert cli.run(_annotate_argv(server, tmp_path, "ref", store="ref.sqlite")) == 0
    ref = tmp_path / "ref"
    assert (run / "annotations.jsonl").read_bytes() == (ref / "annotations.jsonl").read_bytes()
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    for k in ("n", "parsed", "kept", "dropped", "teacher_accuracy", "completion_tokens"):
        assert ours[k] == theirs[k], k
    assert ours["n"] == 30 and ours["kept"] == 30


# ---------------------------------------------------------------- failed writes

@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """Writes past `nbytes` fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    runs.write_json(path, {"old": True})
    old = path.read_bytes()

    with _file_size_limit(1000), pytest.raises(StepDistillError) as err:  # real: the kernel stops the write mid-way
        runs.write_json(path, {"new": "x" * 5000})
    assert str(path) in str(err.value) and "File too large" in str(err.value) and "free disk space" in str(err.value)

    def fail(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    for name in ("fsync", "replace"):  # the last two steps before the new file would be in place
        with monkeypatch.context() as m:
            m.setattr(os, name, fail)
            with pytest.raises(StepDistillError, match="No space left on device"):
                runs.write_jsonl(path, [{"new": 1}])
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failed_model_folder_save_keeps_the_previous_folder(tmp_path):
    dest = tmp_path / "model"
    save_folder(dest, lambda d: (d.mkdir(), (d / "weights").write_text("old")))

    def half_then_full(d):
        d.mkdir()
        (d / "weights").write_text("new, cut sh")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StepDistillError, match="No space left on device"):
        save_folder(dest, half_then_full)
    assert (dest / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("how", ["read-only folder", "size limit"])
def test_unwritable_run_directory_is_one_clear_line(how, server, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    out = parent / "run"
    argv = _annotate_argv(server, tmp_path, str(out))
    limit = contextlib.nullcontext()
    if how == "size limit":
        limit = _file_size_limit(0)
    elif os.geteuid() != 0:
        parent.chmod(0o555)
    else:  # root writes through permission bits: refuse as a read-only folder would
        real_mkdir, real_open = os.mkdir, os.open

        def refuse(path, real):
            def call(p, *a, **k):
                if isinstance(p, (str, os.PathLike)) and Path(p).resolve().is_relative_to(parent.resolve()):
                    raise PermissionError(errno.EACCES, "Permission denied", str(p))
                return real(p, *a, **k)
            return call

        monkeypatch.setattr(os, "mkdir", refuse(parent, real_mkdir))
        monkeypatch.setattr(os, "open", refuse(parent, real_open))
    try:
        with limit, pytest.raises(SystemExit) as code:
            cli.main(argv)
    finally:
        parent.chmod(0o755)
    err = _error_line(capsys.readouterr().err)
    assert code.value.code == 1
    assert err.startswith("stepdistill: error: cannot write ") and str(out) in err
    assert f"make {parent if how != 'size limit' else out} writable" in err and "free disk space" in err
    assert not _temp_files(parent)


def _error_line(stderr: str) -> str:
    """The CLI's one-line error (progress bars aside); never a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("stepdistill:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_full_store_is_one_clear_error_and_keeps_what_was_committed(server, tmp_path, monkeypatch, capsys):
    store_path = tmp_path / "store.sqlite"
    assert cli.run(_annotate_argv(server, tmp_path, "first", n=4)) == 0
    first = {r["key"]: r["completion"] for r in AnnotationStore(store_path).rows()}
    assert len(first) == 4

    real_init = AnnotationStore.__init__

    def full_disk(self, path):  # the store's file may not grow by a page: SQLite reports SQLITE_FULL
        real_init(self, path)
        pages, = self._db.execute("PRAGMA page_count").fetchone()
        self._db.execute(f"PRAGMA max_page_count = {pages}")

    monkeypatch.setattr(AnnotationStore, "__init__", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        cli.main(_annotate_argv(server, tmp_path, "second"))
    err = _error_line(capsys.readouterr().err)
    assert code.value.code == 1
    assert f"cannot commit to the annotation store {store_path}: database or disk is full" in err
    assert "free disk space" in err and "committed so far are kept" in err

    monkeypatch.setattr(AnnotationStore, "__init__", real_init)
    db = sqlite3.connect(store_path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    kept = {r["key"]: r["completion"] for r in AnnotationStore(store_path).rows()}
    assert first.items() <= kept.items()  # every completion committed before is there and readable
    before = server.answered()
    assert cli.run(_annotate_argv(server, tmp_path, "second") + ["--resume"]) == 0
    asked_again = server.answered() - before
    assert len(AnnotationStore(store_path)) == 30 and len(asked_again) == 30 - len(kept)  # only what was missing


def test_a_network_error_during_training_is_not_called_a_full_disk(tmp_path):
    """A failed name lookup is an OSError too: once, a hub lookup inside Trainer was reported as
    'cannot write ...: free disk space'. Only file-system errors are writes."""
    import socket

    from stepdistill.training.checkpoints import failed_write

    lookup = socket.gaierror(-3, "Temporary failure in name resolution")
    wrapped = RuntimeError("could not reach the hub")
    wrapped.__cause__ = lookup
    assert failed_write(wrapped, tmp_path / "checkpoints", 0) is None
    disk = OSError(28, "No space left on device", str(tmp_path / "run" / "train_log.jsonl"))
    err = failed_write(disk, tmp_path / "checkpoints", 0)
    assert err is not None and "free disk space" in str(err)
