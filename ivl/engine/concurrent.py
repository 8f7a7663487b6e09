"""Independent model forwards side by side on the CPU.

A decode step of the residual and proxy schemes runs two or three forwards on the same inputs
that do not depend on each other. At decode batch sizes a forward is a chain of small matrix
products that use intra-op threads poorly (SmolLM2-135M, batch 16, on this project's 2-core
machine: 162 ms per step with 2 threads, 185 ms with 1), so the forwards finish sooner side by
side, each on its own worker thread with its share of the threads, than one after the other
with all of them (two SmolLM2-135M forwards: 242 ms against 324 ms). Torch releases the GIL
inside its ops, so the workers overlap.

Intra-op thread counts are per thread (OpenMP and MKL keep them per thread), so the workers set
theirs once and the caller's threads keep theirs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch


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
