"""Turn a device name (cpu, cuda, cuda:N, mps, auto) into a ``torch.device`` that exists here."""

from __future__ import annotations

import torch

from .errors import GuidedSegError

DEVICE_NAMES = "cpu, cuda, cuda:N, mps, auto"


class DeviceError(GuidedSegError, ValueError):
    """A device that this machine or PyTorch build does not have."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device called ``name``; "auto" picks CUDA (GPU ``local_rank``), then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r} is not one of {DEVICE_NAMES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: this PyTorch build or machine has no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) present")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("device 'mps': Apple MPS is not available here")
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not one of {DEVICE_NAMES}")
    return device


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX): there, mixed
    precision roughly halves the time of 3D convolutions; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False
