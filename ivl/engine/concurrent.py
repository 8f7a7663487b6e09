"""Model forwards on the CPU: side by side (ForwardPool), and with decode-step linears through
ivl's narrow kernel (route_linears / narrow_linears).

A decode step of the residual and proxy schemes runs two or three forwards on the same inputs
that do not depend on each other. At decode batch sizes a forward is a chain of small matrix
products that use intra-op threads poorly (SmolLM2-135M, batch 16, on this project's 2-core
machine: 162 ms per step with 2 threads, 185 ms with 1), so the forwards finish sooner side by
side, each on its own worker thread with its share of the threads, than one after the other
with all of them (two SmolLM2-135M forwards: 242 ms against 324 ms). Torch releases the GIL
inside its ops, so the workers overlap.

Intra-op thread counts are per thread (OpenMP and MKL keep them per thread), so the workers set
theirs once and the caller's threads keep theirs.

Narrow linears: ``nn.Linear`` computes ``x @ W.T`` with BLAS, which for the few rows of a decode
step (16 x 896 x 4,864, Qwen2.5-0.5B's MLP at batch 16) streams ~4-8 GB/s of weight on an AVX2
machine's two threads, little faster than on one. ``torch.ops.ivl.narrow_linear``
(csrc/include/ivl/linear_cpu.h) streams each weight once as dot products of small tiles: there
1.7-6.4x faster at 1-16 fp32 rows on two threads, 4-6x torch's bf16 linear. On AVX-512 / AMX
CPUs torch's own kernels are faster, and the kernel takes fewer rows (NARROW_ROWS, per dtype;
docs/engine.md). IVLModel routes its models' ``nn.Linear`` layers (route_linears: an
instance-level forward, plain ``F.linear`` unless switched on) and ivl's forwards switch them on
per thread (narrow_linears), so the cost is one flag check per linear, not a Python hook per
torch op.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F

from ivl.ops import _native


def _init_worker(threads: int) -> None:
    torch.get_num_threads()  # torch's lazy per-thread init first, or it would undo the next line
    torch.set_num_threads(threads)


def _call(fn: Callable, inference: bool, grad: bool):
    # grad and inference modes are thread-local: the worker takes the caller's
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return fn()


class ForwardPool:
    """Runs callables on ``workers`` threads of ``threads`` intra-op threads each."""

    def __init__(self, workers: int, threads: int):
        if workers < 2 or threads < 1:
            raise ValueError(f"a pool needs >= 2 workers and >= 1 thread, got {workers}, {threads}")
        self.workers, self.threads = workers, threads
        self._executor = ThreadPoolExecutor(
            workers,
            thread_name_prefix="ivl-forward",
            initializer=_init_worker,
            initargs=(threads,),
        )
        # Start every worker now (each waits for the others, so each runs on its own thread),
        # then restore the process-wide default that set_num_threads also wrote in them: threads
        # the user starts later keep this process's count.
        default = torch.get_num_threads()
        barrier = threading.Barrier(workers)
        wait([self._executor.submit(barrier.wait) for _ in range(workers)])
        torch.set_num_threads(default)

    @classmethod
    def for_cpu(cls, n_models: int) -> ForwardPool | None:
        """A pool splitting this process's intra-op threads between ``n_models`` forwards, or
        None when there is nothing to split (one model or one thread)."""
        threads = torch.get_num_threads()
        workers = min(n_models, threads)
        return cls(workers, threads // workers) if workers >= 2 else None

    def run(self, calls: Sequence[Callable]) -> list:
        """The results of ``calls`` in order; the first exception is raised after all ended."""
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        futures = [self._executor.submit(_call, fn, inference, grad) for fn in calls]
        wait(futures)  # never leave a forward running on shared state behind a raised error
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)


# Where the narrow path runs: ivl's kernel needs the native build and AVX2 (the check of
# csrc/include/ivl/linear_cpu.h; IVL_CPU_SIMD=0 turns it off). Without it the op's BLAS fallback
# would widen a 16-bit weight per call, so only fp32 is routed then.
_NARROW_KERNEL = (
    _native.AVAILABLE
    and os.environ.get("IVL_CPU_SIMD") != "0"
    and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
)


def _row_limits() -> dict[torch.dtype, int]:
    """Rows up to which the narrow path beats torch's F.linear, per weight dtype, on this CPU
    (benchmarks/bench_linear.py; docs/engine.md "Narrow linears"). Decode steps and short
    extends only: a prefill of many rows is BLAS's home ground."""
    if not _NARROW_KERNEL:
        return {torch.float32: 64}
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        # AVX2 (measured on AMD EPYC Zen 3): BLAS is slow on few rows (the kernel 1.7-6.4x at
        # 1-16 rows, 1.1-2x at 64) and torch's bf16 linear runs ~20 GFLOP/s (the kernel 4-6x).
        return dict.fromkeys((torch.float32, torch.bfloat16, torch.float16), 64)
    # AVX-512 (measured on a Xeon with AMX): torch's fp32 BLAS catches up by 16 rows (the kernel
    # 1.2-2x at 4-8) and its 16-bit linears use AMX / AVX-512 (the kernel wins at 1-4 fp16 rows,
    # at one bf16 row only).
    return {torch.float32: 8, torch.float16: 4, torch.bfloat16: 1}


NARROW_ROWS = _row_limits()

_switch = threading.local()  # .on: this thread's forwards route their linears (narrow_linears)


def _narrow_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward, through the narrow kernel when this thread asked for it."""
    weight, bias = self.weight, self.bias
    limit = NARROW_ROWS.get(x.dtype, 0) if getattr(_switch, "on", False) else 0
    if limit and x.dtype == weight.dtype:
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            0 < rows <= limit
            and x.device.type == "cpu"
            and (bias is None or bias.dtype == x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        ):
            y = _narrow_linear(x.reshape(rows, x.shape[-1]), weight, bias)
            return y.view(*x.shape[:-1], weight.shape[0])
    # A strided input (HF's logits_to_keep=1 slices the last position out of a prefill) can send
    # torch's CPU bf16 GEMM down a path measured ~450x slower (16 x 896 rows into Qwen's LM head:
    # 11 s against 0.024 s); the copy costs a few KB.
    return F.linear(x.contiguous(), weight, bias)  # no copy when it already is


def route_linears(model: torch.nn.Module) -> None:
    """Let the ``nn.Linear`` layers of ``model`` take the narrow path inside
    :func:`narrow_linears`; outside it they compute ``F.linear`` exactly as before. Layers
    whose forward was already replaced on the instance, and subclasses, are left alone."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and "forward" not in vars(module):
            # a partial, not a bound method: the model still pickles and deep-copies
            module.forward = functools.partial(_narrow_forward, module)


@contextlib.contextmanager
def narrow_linears():
    """Within it, this thread's routed linears (:func:`route_linears`) on at most
    ``NARROW_ROWS[dtype]`` rows of CPU input run ivl's narrow kernel (see the module docstring)."""
    before = getattr(_switch, "on", False)
    _switch.on = True
    try:
        yield
    finally:
        _switch.on = before


def _narrow_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x [M, K] @ weight[N, K].T (+ bias): ivl's kernel, else BLAS with the weight on the left."""
    if _native.AVAILABLE:
        return torch.ops.ivl.narrow_linear(x, weight, bias)
    y = torch.mm(weight, x.T).T
    return (y if bias is None else y + bias).contiguous()


def with_narrow_linears(fn: Callable) -> Callable:
    """``fn`` run inside :func:`narrow_linears` (in whichever thread calls it)."""

    def run():
        with narrow_linears():
            return fn()

    return run
