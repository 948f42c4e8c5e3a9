"""The training precision: one decision for ``optim.amp`` on a device, read by both engines and the plan.

``optim.amp``:

* ``auto``: bf16 where the device computes it natively (a CUDA GPU of compute capability 8.0 or later), fp16 with
  loss scaling on a CUDA GPU without it, fp32 on a CPU;
* ``bf16`` / ``fp16`` / ``none`` (fp32): as written; fp16 needs a CUDA GPU.

The torch engine autocasts to the chosen type (fp16: with a ``GradScaler``); DeepSpeed enables its own bf16 or fp16
mode from it (``dist_coop.distributed.engine.deepspeed_config``). So ``auto`` trains the same way under both.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("bf16", "fp16", "fp32")
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def cuda_bf16(device: torch.device) -> bool:
    """Does this CUDA device compute bf16 natively? (Emulated bf16, e.g. on a V100, counts as no: it is slow.)"""
    here = device.index is not None and torch.cuda.is_available()
    with torch.cuda.device(device) if here else contextlib.nullcontext():
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_precision(amp: str, device: torch.device | str, *, bf16: bool | None = None) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: what ``optim.amp`` trains in on ``device``.

    ``bf16``: whether the CUDA device has bf16, when the caller knows (a plan made away from the GPUs); None: ask
    the device (``cuda_bf16``).
    """
    device = torch.device(device)
    if amp == "none":
        return "fp32"
    if amp == "bf16":
        return "bf16"
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError(f"optim.amp: fp16 needs a CUDA device, and this run is on {device.type}; use bf16 or none")
        return "fp16"
    if amp != "auto":
        raise ValueError(f"optim.amp must be one of ['none', 'bf16', 'fp16', 'auto'], got {amp!r}")
    if device.type != "cuda":
        return "fp32"
    return "bf16" if (cuda_bf16(device) if bf16 is None else bf16) else "fp16"


def precision_line(amp: str, device: torch.device | str, *, bf16: bool | None = None, assumed: bool = False) -> str:
    """``precision: bf16 (optim.amp auto, cuda:0 supports bf16)``: the decision and why, printed at start.

    ``assumed``: ``bf16`` is the plan's assumption about GPUs it cannot see, said so in the line.
    """
    device = torch.device(device)
    chosen = resolve_precision(amp, device, bf16=bf16)
    shown = f"{chosen} with loss scaling" if chosen == "fp16" else chosen
    if amp != "auto":
        return f"precision: {shown} (optim.amp {amp})"
    if device.type != "cuda":
        return f"precision: {shown} (optim.amp auto on {device.type})"
    if assumed:
        return (
            f"precision: {shown} (optim.amp auto; assumed: GPUs {'with' if chosen == 'bf16' else 'without'} bf16; "
            "auto gives bf16 on compute capability 8.0+ (A100, H100), fp16 with loss scaling on older GPUs)"
        )
    return f"precision: {shown} (optim.amp auto, {device} {'supports bf16' if chosen == 'bf16' else 'has no bf16'})"
