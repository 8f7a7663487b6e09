"""Where the CUDA merge_sample spends its time: per-kernel device times (torch.profiler).

    python -m benchmarks.profile_merge_sample_cuda [--once]

For a few configurations (B = 64 and 1, V = 151,936, bf16; the modes of bench_merge_sample), 20
calls of the registered op with validated arguments, with and without logprobs; prints each
kernel's mean time per call and appends rows to benchmarks/results/merge_sample_kernels.csv.
Needs a CUDA device and ivl._C built with its CUDA kernels. ``--once``: one call at B = 64,
temp+remap, nothing else (a target for Nsight Compute: benchmarks/gpu_check.sh runs it so).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks._common import append_csv
from benchmarks.bench_merge_sample import MODES, cuda_kw, make_inputs, op_args
from ivl.ops import _native

CONFIGS = [(64, 151936, mode) for mode in ("greedy", "temperature", "temp+remap", "top-k", "top-p")]
CONFIGS += [(1, 151936, "temperature")]
CALLS = 20


def kernel_times(call, calls: int = CALLS) -> dict[str, float]:
    """Mean device microseconds per call of each kernel ``call`` launches."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:  # kernels (and copies) only, not the host ops
            continue
        m = re.search(r"(\w+_kernel|\w+Kernel\w*|Memset|Memcpy\w*)", evt.name)
        out[m.group(1) if m else evt.name[:40]] += evt.time_range.elapsed_us() / calls
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="one call at B=64, temp+remap")
    once = parser.parse_args().once
    if not torch.cuda.is_available() or not _native.HAS_CUDA:
        raise SystemExit("needs a CUDA device and ivl._C with CUDA kernels")
    rows = []
    for b, v, mode in [(64, 151936, "temp+remap")] if once else CONFIGS:
        base, value, kw, data = make_inputs(b, v, torch.bfloat16, mode, "llm")
        kw = cuda_kw(kw)
        base, value = base.cuda(), value.cuda()
        seed, step = torch.arange(b).cuda(), torch.full((b,), 7).cuda()
        margs, pargs = op_args(base, value, kw, MODES[mode], seed, step)
        args = (base, value, *margs, *pargs)
        if once:
            _native.merge_sample(*args, True)
            torch.cuda.synchronize()
            return
        for want_lp in (True, False):
            times = kernel_times(lambda a=args, w=want_lp: _native.merge_sample(*a, w))
            total = sum(times.values())
            parts = "  ".join(f"{k} {t:.1f}" for k, t in sorted(times.items(), key=lambda x: -x[1]))
            print(
                f"B={b:<3} {mode:<12} logprobs={want_lp!s:<5} {total:8.1f} us: {parts}", flush=True
            )
            for name, t in times.items():
                rows.append(
                    dict(op="merge_sample", provider="ivl-cuda", kernel=name, data=data, mode=mode,
                         B=b, V=v, dtype="bfloat16", logprobs=want_lp, us_per_call=round(t, 2),
                         total_us_per_call=round(total, 2))
                )  # fmt: skip
    print(f"appended {len(rows)} rows to {append_csv('merge_sample_kernels', rows)}")


if __name__ == "__main__":
    main()
