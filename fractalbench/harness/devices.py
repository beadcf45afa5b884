"""Devices: the one place that parses and checks device strings (cpu, cuda, cuda:N)."""
from __future__ import annotations

DEVICE_HELP = "cpu, cuda or cuda:N"


def parse_device(text: str) -> str:
    """``text`` when it is written like a device (no check that the device exists); ValueError otherwise."""
    if isinstance(text, str) and (text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())):
        return text
    raise ValueError(f"device {text!r} is not allowed; allowed: {DEVICE_HELP}")


def check_device(device: str) -> str:
    """``device`` when this machine has it; ValueError naming it and what is allowed otherwise."""
    import torch

    if not isinstance(device, str):
        raise ValueError(f"device must be a string ({DEVICE_HELP}), got {device!r}")
    parse_device(device)
    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but this machine has no CUDA device; use cpu")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: "
                         f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
