"""Which torch device a name means: the one rule every command uses."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/'auto' → this process's GPU if there is one, else the CPU. Under torchrun (LOCAL_RANK) or an srun
    step (SLURM_LOCALID) each process of a node takes its own GPU of those it sees, not all of them the first.
    ValueError for a name torch does not know."""
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        return torch.device(f"cuda:{int(local) % torch.cuda.device_count() if local.isdigit() else 0}")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from e
