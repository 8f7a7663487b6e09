"""Shared benchmark plumbing: timing, the machine's read bandwidth, CSV rows with provenance.

Benchmarks compare providers side by side in one run and report ratios; absolute times on these
shared machines are noisy, so every number is a median of repeated runs.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def p50(
    fn: Callable[[], object],
    *,
    reps: int = 20,
    warmup: int = 3,
    min_time: float = 0.2,
    device: str = "cpu",
) -> float:
    """Median seconds per call over at least ``reps`` calls (more for very fast calls).

    On CUDA every call is followed by a synchronize, so the time covers the kernels.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * reps:
            break
    return statistics.median(times)


def read_bandwidth(nbytes: int = 256 << 20, device: str = "cpu") -> float:
    """Measured read bandwidth of ``device`` in GB/s (torch .sum over a large fp32 buffer)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / p50(x.sum, reps=10, device=device) / 1e9


def copy_bandwidth(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus written."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / p50(lambda: y.copy_(x), reps=10, device=device) / 1e9


def device_time(
    call: Callable[[int], object], n_sets: int, *, graph: bool, reps: int = 7
) -> tuple[float, str]:
    """Seconds per call of ``call(i)`` on the GPU, and how they were measured.

    One measurement is ``n_sets`` calls, each on its own input set (callers rotate sets so the
    inputs do not sit in L2 between calls), timed with CUDA events; the median over ``reps``.
    With ``graph`` the calls are captured in a CUDA graph and replayed, so launch gaps and
    Python overhead stay out and the time is the kernels' own; otherwise (calls with host syncs,
    which a capture refuses), or if the capture fails, they run back to back, launches included.
    """
    call(0)
    torch.cuda.synchronize()
    run, how = (lambda: [call(i) for i in range(n_sets)]), "back to back"
    if graph:
        run, how = _captured(call, n_sets, fallback=(run, how))
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n_sets)
    return statistics.median(times), how


def _captured(call: Callable[[int], object], n_sets: int, fallback: tuple) -> tuple:
    """(replay, "cuda graph") for the n_sets calls, or ``fallback`` if they cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture wants its warm-up off the default stream
            for i in range(n_sets):
                call(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n_sets):
                call(i)
        return graph.replay, "cuda graph"
    except Exception as exc:
        torch.cuda.synchronize()
        return fallback[0], f"{fallback[1]} (capture failed: {type(exc).__name__})"


_CODE_PATHS = ("ivl", "csrc", "benchmarks/*.py")


def provenance() -> dict[str, str]:
    """Machine, versions and date stamped on every CSV row.

    IVL_COMMIT overrides the commit: a copy of the tree run elsewhere (the GPU machine) may carry
    a stale .git, so the caller states the commit it sent."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        # code changed since that commit: the row does not describe the commit alone
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *_CODE_PATHS],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if commit and changed:
            commit += "+dirty"
    except OSError:
        commit = ""
    commit = os.environ.get("IVL_COMMIT", commit)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{cpu} x{os.cpu_count()} threads={torch.get_num_threads()}",
        "torch": torch.__version__,
        "commit": commit,
    }


def append_csv(name: str, rows: list[dict[str, object]]) -> Path:
    """Append rows (with provenance) to benchmarks/results/<name>.csv under its header.

    Columns are matched by name; rows with columns the file lacks widen the header (the file is
    rewritten atomically, older rows get empty cells), so rows of different kinds share a file.
    """
    from ivl._fs import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    stamp = provenance()
    rows = [{**row, **stamp} for row in rows]
    old: list[dict[str, str]] = []
    header: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, old = list(reader.fieldnames or []), list(reader)
    fields = list(dict.fromkeys([*header, *(k for row in rows for k in row)]))
    if header and fields == header:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, restval="").writerows(rows)
        return path
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows([*old, *rows])
    atomic_write_text(path, buf.getvalue())
    return path
