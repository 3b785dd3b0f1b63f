"""Crash-safe checkpoints and saves for training.

Trainer writes checkpoint-N in place, so a kill mid-save leaves a half-written folder that
`get_last_checkpoint` would pick. A checkpoint therefore counts only once it is sealed: every
file fsynced, then checkpoint-N/stepdistill-checkpoint.json (the files and their sizes) written
atomically. Resume takes the last sealed checkpoint and removes unsealed ones; old checkpoints
are rotated only after the new one is sealed; a saved model folder appears by a rename.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from stepdistill.errors import StepDistillError
from stepdistill.students import MODEL_INFO
from stepdistill.runs import fsync_dir, fsync_tree, write_error, write_json, write_text

SEAL = "stepdistill-checkpoint.json"  # in checkpoint-N once every file of it is on disk
SEALS = "stepdistill-seals.json"  # in checkpoints/: {"sealed_after": S}, checkpoints past step S need a seal
KEEP_CHECKPOINTS = 2  # sealed checkpoints kept (the best one always, besides)


class JsonlLog(TrainerCallback):
    """Appends every Trainer log line (loss, lr, eval accuracy) to train_log.jsonl as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class SealCheckpoint(TrainerCallback):
    """Runs after every other on_save (the co-distillation teacher included): fsync the new
    checkpoint, seal it, and only then delete old ones, so a sealed checkpoint always remains."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        files = fsync_tree(folder)
        write_json(folder / SEAL, {"step": state.global_step, "files": files})
        fsync_dir(folder.parent)
        rotate_checkpoints(args.output_dir, save_total_limit=KEEP_CHECKPOINTS,
                           best_model_checkpoint=state.best_model_checkpoint)


def checkpoint_step(folder: Path) -> int | None:
    prefix = PREFIX_CHECKPOINT_DIR + "-"
    tail = folder.name[len(prefix):] if folder.name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def is_sealed(folder: Path) -> bool:
    """Is checkpoint-N complete: sealed, and every file the seal lists there with its size?"""
    try:
        files = json.loads((folder / SEAL).read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _legacy_complete(folder: Path) -> bool:
    """A checkpoint from before sealing: Trainer writes trainer_state.json last, so a parseable one
    with this step means Trainer finished the folder (short of a power loss)."""
    try:
        return json.loads((folder / "trainer_state.json").read_text()).get("global_step") == checkpoint_step(folder)
    except (OSError, ValueError, AttributeError):
        return False


def find_checkpoints(root: Path) -> tuple[Path | None, list[Path]]:
    """(the last complete checkpoint or None, the incomplete ones) under `root`.

    >>> find_checkpoints(Path("runs/x/checkpoints"))  # (Path(".../checkpoint-6"), [Path(".../checkpoint-9")])
    """
    if not root.is_dir():
        return None, []
    found = sorted((p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)
    sealed_after = None  # no SEALS file: a run from before sealing, whose checkpoints have none
    if (root / SEALS).exists():
        try:
            sealed_after = int(json.loads((root / SEALS).read_text())["sealed_after"])
        except (OSError, ValueError, KeyError, TypeError):
            sealed_after = 0
    done = [p for p in found if is_sealed(p) or (
        (sealed_after is None or checkpoint_step(p) <= sealed_after) and _legacy_complete(p))]
    return (done[-1] if done else None), [p for p in found if p not in done]


def trim_log(path: Path, step: int) -> None:
    """On resume, keep the log lines up to the checkpoint's step: later ones are about to be
    logged again, and a line a kill cut short is not JSON."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(keep))


def save_folder(dest: Path, save) -> None:
    """`save(folder)` into a temp folder beside `dest`, fsync, then rename it to `dest` (replacing an
    older one): a reader sees the old folder or the complete new one, never a half-written one."""
    tmp, old = dest.with_name(f".{dest.name}.tmp"), dest.with_name(f".{dest.name}.old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
        save(tmp)
        fsync_tree(tmp)
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        fsync_dir(dest.parent)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # free what it took: the disk may be full
        if old.exists() and not dest.exists():
            old.rename(dest)
        raise write_error(dest, os_error(e) or e) from e
    shutil.rmtree(old, ignore_errors=True)


# the errors of a file that cannot be written; a refused connection or a failed name lookup is an
# OSError too, and must not be reported as a full disk
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                 errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EMFILE, errno.ENFILE}


def os_error(e: BaseException | None) -> OSError | None:
    """The file-system error behind an exception (torch and safetensors wrap the one from a failed
    write); None when there is none (network errors are OSErrors, but not writes)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def refused_pickle(e: BaseException) -> bool:
    """torch.load(weights_only=True) met a pickle that is more than tensors (and did not run it)."""
    import pickle

    return isinstance(e, pickle.UnpicklingError) or "weights only load failed" in str(e).lower()


def failed_write(e: Exception, ckpt_root: Path, step: int) -> StepDistillError | None:
    """A write that failed during training (a checkpoint, the log) as one clear error, or None when
    `e` is no failed write. The unsealed checkpoint is removed (it may be what filled the disk)."""
    folder = ckpt_root / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    unsealed = folder.is_dir() and not is_sealed(folder)
    os_err = os_error(e)
    if not unsealed and os_err is None:
        return None
    if unsealed:
        shutil.rmtree(folder, ignore_errors=True)
    last, _ = find_checkpoints(ckpt_root)
    where = folder if unsealed else Path(os_err.filename or ckpt_root.parent)
    err = write_error(where, os_err or e)
    then = f"training continues from {last.name}" if last else "no checkpoint is complete, so training starts over"
    return StepDistillError(f"training stopped: {err} with --resume: {then}")


def save_model(model, tokenizer, info: dict[str, Any], folder: Path) -> None:
    """Weights, tokenizer and stepdistill.json (what `load_trained` needs) into `folder`."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
