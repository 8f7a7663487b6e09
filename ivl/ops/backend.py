"""Which implementation runs an op: probed once, logged, overridable.

Backends: ``cpu`` (C++ kernels in ivl._C), ``cuda`` (CUDA kernels in ivl._C), ``triton``,
``torch`` (the pure-PyTorch reference, always available). The automatic choice takes the first
backend that is available and implements the op, in the order preferred for the tensor's device,
and logs it once with the reasons the others were passed over. ``IVL_BACKEND=cpu|cuda|triton|torch``
forces one backend and raises if it cannot run the op: never a silent fallback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache

import torch

log = logging.getLogger("ivl")

NAMES = ("cpu", "cuda", "triton", "torch")
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_DEVICE_OF = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}  # torch runs anywhere

# op name -> backend name -> callable; filled by ivl.ops at import.
_IMPLS: dict[str, dict[str, Callable]] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    """Declare that ``backend`` implements ``op`` with ``fn``."""
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(NAMES)}")
    _IMPLS.setdefault(op, {})[backend] = fn
    _choose.cache_clear()


@cache
def unavailable() -> dict[str, str]:
    """Backends that cannot run on this machine, with the reason."""
    from . import _native

    why: dict[str, str] = {}
    if not _native.AVAILABLE:
        why["cpu"] = why["cuda"] = f"native extension not loaded ({_native.REASON})"
    if not torch.cuda.is_available():
        why.setdefault("cuda", "no CUDA device")
        why["triton"] = "no CUDA device"
    elif not _native.HAS_CUDA:
        why.setdefault("cuda", "ivl._C was built without CUDA kernels (rebuild with nvcc present)")
    if "triton" not in why:
        from . import triton as _triton

        ok, reason = _triton.available()
        if not ok:
            why["triton"] = reason
    return why


def _reject_reason(op: str, backend: str, device: str) -> str | None:
    if backend in unavailable():
        return unavailable()[backend]
    if _DEVICE_OF.get(backend, device) != device:
        return f"runs on {_DEVICE_OF[backend]} tensors, not {device}"
    if backend not in _IMPLS.get(op, {}):
        return f"has no {op} kernel yet"
    return None


@cache
def _choose(op: str, device: str, forced: str | None) -> str:
    if forced is not None:
        if forced not in NAMES:
            raise RuntimeError(f"IVL_BACKEND={forced!r} is not a backend; use one of {NAMES}")
        reason = _reject_reason(op, forced, device)
        if reason is not None:
            raise RuntimeError(
                f"IVL_BACKEND={forced} cannot run {op} on {device}: {reason}. "
                "Unset IVL_BACKEND to choose automatically."
            )
        log.info("%s on %s uses backend %r (forced by IVL_BACKEND)", op, device, forced)
        return forced
    rejected = []
    for name in _PREFERENCE.get(device, ("torch",)):
        reason = _reject_reason(op, name, device)
        if reason is None:
            extra = f" (passed over: {'; '.join(rejected)})" if rejected else ""
            log.info("%s on %s uses backend %r%s", op, device, name, extra)
            return name
        rejected.append(f"{name}: {reason}")
    raise RuntimeError(f"no backend can run {op} on {device}: {'; '.join(rejected)}")


def choose(op: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``."""
    return _choose(op, device.type, os.environ.get("IVL_BACKEND") or None)


def implementation(op: str, device: torch.device) -> Callable:
    """The callable implementing ``op`` for ``device`` (see ``choose``)."""
    return _IMPLS[op][choose(op, device)]
