"""Model forwards on the CPU: side by side (ForwardPool), and with narrow linears that use
every thread (NarrowLinears).

A decode step of the residual and proxy schemes runs two or three forwards on the same inputs
that do not depend on each other. At decode batch sizes a forward is a chain of small matrix
products that use intra-op threads poorly (SmolLM2-135M, batch 16, on this project's 2-core
machine: 162 ms per step with 2 threads, 185 ms with 1), so the forwards finish sooner side by
side, each on its own worker thread with its share of the threads, than one after the other
with all of them (two SmolLM2-135M forwards: 242 ms against 324 ms). Torch releases the GIL
inside its ops, so the workers overlap.

Intra-op thread counts are per thread (OpenMP and MKL keep them per thread), so the workers set
theirs once and the caller's threads keep theirs.

Why decode matmuls use threads poorly: ``nn.Linear`` computes ``x @ W.T``, and for few rows
(16 x 896 x 4,864, Qwen2.5-0.5B's MLP at batch 16) MKL runs that 1.1-1.4x faster on two threads
than on one, while ``(W @ x.T).T``, the same product with the weight on the left, runs ~2x
faster (1.3-2.2x faster than ``x @ W.T`` on two threads; equal on one). NarrowLinears routes
linears of few rows through the latter. It helps a forward that has several threads; side by
side each forward has one, so the engine overlaps forwards of similar cost and runs a big base
with a small value one after the other, each with every thread (IVLEngine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


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


# Rows up to which (W @ x.T).T beats x @ W.T: decode steps and short extends (measured at 16
# and 64 rows; a prefill of thousands of rows already uses every thread).
NARROW_ROWS = 64


class NarrowLinears(TorchFunctionMode):
    """Within it, ``F.linear`` on at most NARROW_ROWS rows of fp32 CPU input computes
    ``(W @ x.T).T``: the same product, with the weight as the left operand (see the module
    docstring). Modes are per thread: enter it in the thread that runs the forward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // max(x.shape[-1], 1)
            if (
                0 < rows <= NARROW_ROWS
                and x.device.type == "cpu"
                and x.dtype == weight.dtype == torch.float32
                and weight.dim() == 2
            ):
                y = torch.mm(weight, x.reshape(rows, x.shape[-1]).T).T
                if bias is not None:
                    y = y + bias
                return y.contiguous().view(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


def with_narrow_linears(fn: Callable) -> Callable:
    """``fn`` run inside :class:`NarrowLinears` (in whichever thread calls it)."""

    def run():
        with NarrowLinears():
            return fn()

    return run
