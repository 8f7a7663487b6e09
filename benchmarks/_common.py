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


_CODE_PATHS = ("ivl", "csrc", "benchmarks/*.py")


def provenance() -> dict[str, str]:
    """Machine, versions and date stamped on every CSV row."""
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
