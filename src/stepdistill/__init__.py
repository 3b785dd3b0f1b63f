"""stepdistill: distil a large language model into a small, fast, task-specific student.

The pipeline, one module per stage: tasks/ -> teachers/ -> store.py -> methods/ + training.py
-> evaluation.py. The Python API mirrors the CLI:

>>> import stepdistill as sd
>>> sd.annotate(cfg, out="runs/ann"); sd.train(cfg, out="runs/sbs"); sd.evaluate(cfg)
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import stepdistill` stays fast (torch/transformers load only when a stage runs).
    if name in ("annotate", "train", "evaluate"):
        from stepdistill import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["annotate", "train", "evaluate", "__version__"]
