"""Checkpoints: model (and optionally optimizer/scheduler) state, loaded with ``weights_only=True``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


def save_checkpoint(path: Path, model: nn.Module, *, spec: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    epoch: int = 0, extra: dict[str, Any] | None = None) -> None:
    """Write atomically (temporary file + rename) so an interrupted save leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "spec": spec or {},
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra or {},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True``; CheckpointError names the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fractalbench checkpoint: "
                              f"{str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a fractalbench checkpoint "
                              f"(format {CHECKPOINT_FORMAT} expected)")
    return state


def load_model_state(model: nn.Module, state: dict[str, Any], path: Path | str = "<checkpoint>") -> None:
    """Load weights strictly; a mismatch names the checkpoint and the first differing keys."""
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"checkpoint {path} does not match the model: {first}") from None


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    state = read_checkpoint(path)
    load_model_state(model, state, path)
    return state
