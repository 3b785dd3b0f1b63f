"""`stepdistill train` under torchrun: 2 CPU processes (gloo) train exactly what 1 process with
twice the gradient accumulation trains (same global batch), and only rank 0 writes the run. The
default training path: the fused output layer and loss run inside DDP's forward.
Tiny models; about a minute (process start-up dominates), so marked slow."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from stepdistill import api
from stepdistill.tasks import get_task
from stepdistill.testing.openai_server import FakeOpenAIServer
from tiny_models import llama_student, t5_student

pytestmark = pytest.mark.slow


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    qs = get_task("quickstart").load("train")[:36]  # 4 validation + 32 training: 4 whole global batches of 8
    (d / "data.jsonl").write_text("".join(json.dumps({"input": e.input, "label": e.label}) + "\n" for e in qs))
    for name, make in (("llama", llama_student), ("t5", t5_student)):
        s = make(0)
        s.model.save_pretrained(d / name)
        s.tokenizer.save_pretrained(d / name)
    gold = {e.input: e.label for e in qs}

    def answer(prompt, body):
        q = prompt.rsplit("Q: ", 1)[1].split("\nA:")[0].strip()
        return f"Work it out. The answer is {gold[q]}."

    with FakeOpenAIServer(answer) as srv:
        api.annotate({"task": {"name": "svamp", "path": str(d / "data.jsonl")}, "split": "train",
                      "teacher": {"kind": "openai", "base_url": srv.url, "model": "m"}},
                     d / "ann", store_path=d / "s.sqlite", echo=lambda _: None)
    return d


def _train(d, student, method, out, *, processes):
    m = {"name": method}
    if method == "co-distill":  # the teacher: the same tiny model, trained beside the student
        m["kd"] = {"teacher": str(d / student), "weight": 0.5, "warmup_steps": 1}
    cfg = {"task": {"name": "svamp", "path": str(d / "data.jsonl")}, "student": {"model": str(d / student)},
           "method": m, "annotations": str(d / "ann"),
           "training": {"max_steps": 4, "batch_size": 4, "grad_accum": 1 if processes == 2 else 2,
                        "learning_rate": 1e-3, "logging_steps": 1, "bf16": False, "val_fraction": 0.1,
                        "eval_steps": 2, "seed": 0}}
    (d / f"{out}.yaml").write_text(yaml.safe_dump(cfg))
    cli = ["-m", "stepdistill.cli", "train", "--config", str(d / f"{out}.yaml"), "--out", str(d / out)]
    if processes == 2:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()), *cli]
    else:
        cmd = [sys.executable, *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / out


@pytest.mark.parametrize("student, method", [("llama", "standard"), ("t5", "step-by-step"), ("llama", "co-distill")])
def test_two_processes_train_like_one_with_twice_the_accumulation(workdir, student, method):
    one = _train(workdir, student, method, f"{student}-{method}-1proc", processes=1)
    two = _train(workdir, student, method, f"{student}-{method}-2proc", processes=2)
    logs = {}
    for run in (one, two):
        logs[run] = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    steps = {run: [(x["step"], x["loss"], x["grad_norm"]) for x in rows if "grad_norm" in x] for run, rows in logs.items()}
    assert [s for s, _, _ in steps[two]] == [1, 2, 3, 4]  # rank 0 alone wrote the log: no line twice
    for (s1, loss1, g1), (_, loss2, g2) in zip(steps[one], steps[two]):
        assert loss2 == pytest.approx(loss1, rel=1e-3), f"step {s1}"
        assert g2 == pytest.approx(g1, rel=1e-3), f"step {s1}"
    m = json.loads((two / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_batch_size"] == 8  # reported global, not per device
    log = (two / "log.txt").read_text()
    assert log.count(f"train {method} on svamp/train") == 1 and "global batch 8 (4 per device x 1 accumulation x 2 processes)" in log
    assert (two / "model" / "stepdistill.json").is_file()
    sealed = sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert sealed == ["checkpoint-2", "checkpoint-4"]
    if method == "co-distill":  # the trained teacher too: its gradients were averaged over the processes
        from safetensors.torch import load_file

        t1, t2 = (load_file(run / "teacher_model" / "model.safetensors") for run in (one, two))
        start = load_file(workdir / student / "model.safetensors")
        assert any((t1[k] - start[k]).abs().max() > 1e-4 for k in t1)  # the teacher did train
        for k in t1:
            torch.testing.assert_close(t2[k], t1[k], atol=1e-5, rtol=1e-3, msg=k)


SHARD_CHILD = r"""
import json, sys
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

sys.path.insert(0, sys.argv[1])
from tiny_models import llama_student
from stepdistill.training.placement import place_teacher

real = Accelerator(cpu=True)  # gloo; accelerate runs FSDP on GPUs only, so this one is seen as FSDP2:


class FSDP2View:
    distributed_type, is_fsdp2, torch_device_mesh, parallelism_config = DistributedType.FSDP, True, None, None
    state = SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]))

    def __getattr__(self, name):
        return getattr(real, name)


teacher = llama_student(1).model.eval()
ids = torch.randint(0, teacher.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    whole = teacher(input_ids=ids).logits
total = sum(p.numel() for p in teacher.parameters())
sharded = place_teacher(FSDP2View(), teacher)
held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in sharded.parameters())
with torch.no_grad():
    out = sharded(input_ids=ids).logits
print("RESULT " + json.dumps({"rank": real.process_index, "type": type(sharded).__name__, "total": total,
                              "held": held, "max_diff": float((out - whole).abs().max())}), flush=True)
# both ranks done with the sharded teacher's gathers, then the group torn down before exit: left to
# the interpreter's exit, gloo's threads sometimes aborted a rank ("terminate called without an
# active exception") after its result was printed
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_under_fsdp2_the_kd_teacher_is_sharded_and_computes_the_same_logits(tmp_path):
    """Two processes (gloo): place_teacher shards the frozen teacher with accelerate's FSDP2
    preparation: each process holds about half its parameters, and its logits are the whole
    teacher's. (Accelerate itself runs FSDP on GPUs only, so the accelerator is presented as an
    FSDP2 one; the sharding, the gathers and the forward pass are real.)"""
    from pathlib import Path

    (tmp_path / "child.py").write_text(SHARD_CHILD)
    tests = str(Path(__file__).parent)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(tmp_path / "child.py"), tests]
    r = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", r.stdout)]  # two ranks' lines may interleave
    assert sorted(x["rank"] for x in results) == [0, 1]
    for x in results:
        assert x["type"].startswith("FSDP") and x["max_diff"] == 0.0
        assert x["held"] < 0.6 * x["total"]  # about half each (embeddings and blocks split row-wise)
    assert sum(x["held"] for x in results) == results[0]["total"]
