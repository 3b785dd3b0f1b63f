"""Where a soft-label KD teacher lives in a distributed run: beside the student, or sharded like it."""

from __future__ import annotations

import torch

from stepdistill.errors import StepDistillError


def place_teacher(accelerator, model: torch.nn.Module, *, trainable: bool = False) -> torch.nn.Module:
    """The soft-label KD teacher, placed for the student's distributed set-up (a known failure of
    other toolkits is a teacher left whole on the wrong device, or unsharded beside a sharded student):

    * one process, DDP, DeepSpeed ZeRO-1/2: moved to this process's device. It is frozen, so no
      wrapper is needed (a co-distilled teacher has its gradients averaged by _TeacherSteps).
    * FSDP2 (`fsdp_version: 2`): sharded as the student is, with accelerate's own preparation
      (the plugin's wrap policy, mixed precision, offload): each process holds 1/N of it, and its
      forward gathers a block at a time.
    * FSDP1, DeepSpeed ZeRO-3, and co-distillation under FSDP/DeepSpeed: refused with the way out,
      rather than run unsharded or with a teacher the sharded optimizer cannot update.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    sharded = kind == DistributedType.FSDP or (
        kind == DistributedType.DEEPSPEED and _zero_stage(accelerator) == 3)
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) and trainable:
        raise StepDistillError(f"co-distillation trains the teacher inside the student's optimizer, which {kind.value} "
                               "shards: run it under DDP (configs/accelerate/ddp_8gpu.yaml), or use method.kd with a "
                               "fixed teacher")
    if not sharded:
        return model.to(accelerator.device)
    if kind == DistributedType.FSDP and getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model.to(accelerator.device)).eval()
    raise StepDistillError(f"the soft-label KD teacher can be sharded under FSDP2 only, not {kind.value}"
                           f"{' ZeRO-3' if kind == DistributedType.DEEPSPEED else ' (fsdp_version 1)'}: set "
                           "fsdp_version: 2 (configs/accelerate/fsdp_8gpu.yaml), or write the teacher's top-k once "
                           "with kd.cache and train without it")


def _zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", None) if plugin is not None else None
