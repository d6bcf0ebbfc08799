"""Device kinds (cpu, cuda, Ascend npu): resolving a name to a usable device, and the
per-kind calls the harness needs (synchronize, peak memory).

NPU support comes from `torch_npu`, imported only when an npu device is asked
for; it registers `torch.npu` and the "npu" device type with PyTorch. Two other
modules branch on the kind, each for its own concern: kernels/ (each candidate
kernel says which kinds it runs on; the probe checks it there) and parallel.py
(the collective backend per kind).
"""

from __future__ import annotations

import importlib

import torch

from .errors import InputError

KINDS = ("cpu", "cuda", "npu")


def resolve(name: str | torch.device) -> torch.device:
    """Turn "cpu", "cuda", "cuda:1", "npu:0" into a usable `torch.device`, or explain why not."""
    text = str(name)
    kind = text.split(":", 1)[0]
    if kind not in KINDS:
        raise InputError(f"device {text!r}: expected one of cpu, cuda[:i], npu[:i]")
    if kind == "npu":
        _import_torch_npu()
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise InputError(f"device {text!r}: {err}") from None
    if kind != "cpu":
        backend = getattr(torch, kind)
        if not backend.is_available():
            raise InputError(f"device {text!r}: no {kind} device is available on this machine")
        if device.index is not None and device.index >= backend.device_count():
            raise InputError(
                f"device {text!r}: only {backend.device_count()} {kind} device(s) present"
            )
    return device


def _import_torch_npu() -> None:
    try:
        importlib.import_module("torch_npu")
    except ImportError as err:
        raise InputError(
            f"device npu needs the torch_npu package (pip install '.[npu]'): {err}"
        ) from None


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so host timers measure finished work."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: the allocator's on accelerators, RSS on CPU (Linux)."""
    if device.type != "cpu":
        getattr(torch, device.type).reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass  # not Linux: the peak then covers the whole process


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since `reset_peak_memory`: allocator peak on accelerators, peak RSS on CPU."""
    if device.type != "cpu":
        return int(getattr(torch, device.type).max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
