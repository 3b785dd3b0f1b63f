"""On CUDA: every method this sweep uses trains a few steps on a tiny model, default speed-ups on."""
import tempfile, time
from pathlib import Path
import torch
from stepdistill.config import MethodConfig, TrainingConfig
from stepdistill.methods import get_method
from stepdistill.training import fit
from tiny_models import FakeTask, annotations, examples, llama_student

exs = examples(16)
for name, src in [("standard", "gold"), ("step-by-step", "gold"), ("step-by-step", "teacher"), ("label-rationale", "gold"), ("label-rationale", "teacher"),
                  ("rationale-label", "gold"), ("distill", "gold")]:
    m = MethodConfig(name=name, label_source=src)
    recs = get_method(m).records(exs, annotations(exs)).records
    t = time.time()
    out = fit(llama_student(), m, TrainingConfig(max_steps=8, learning_rate=1e-2, batch_size=8, eval_steps=8),
              recs, exs[:4], FakeTask(), Path(tempfile.mkdtemp()) / "r", progress=False)
    print(name, src, "ok", round(time.time() - t, 1), "s", (out.get("train_loss") or [None])[-1], out["best_val_accuracy"],
          torch.cuda.max_memory_allocated() // 2**20 if torch.cuda.is_available() else 0, "MiB")
