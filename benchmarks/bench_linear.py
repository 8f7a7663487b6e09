"""Decode-step linears on the CPU: torch's F.linear vs ivl's narrow kernel, side by side.

    python -m benchmarks.bench_linear [--quick] [--threads N]

Providers: ``torch-linear`` (``F.linear``, what ``nn.Linear`` runs: BLAS ``x @ W.T``),
``torch-weight-left`` (``(W @ x.T).T``, the same product with the weight as BLAS's left
operand) and ``ivl-cpu`` (``torch.ops.ivl.narrow_linear``). Shapes: the linears of
Qwen2.5-0.5B (MLP up / down, attention q, the 151,936-token head), SmolLM2-135M's head and
Qwen2.5-1.5B's MLP up and head, at 1-64 rows (a decode step's batch), in fp32 or (``--dtype``)
a 16-bit model's dtype. Reports p50 time, weight bytes streamed / time as a fraction
of the machine's read bandwidth, GFLOP/s and the speed-up over ``torch-linear``; appends CSV
rows to benchmarks/results/linear.csv. Weights are larger than the caches for the heads only:
the MLP rows are L3-warm (a forward streams each layer's weights from memory once, so inside a
real forward those products run closer to the head's bandwidth).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks._common import append_csv, p50, read_bandwidth
from ivl.ops import _native

SHAPES = {  # name: (out features N, in features K)
    "qwen0.5b-mlp-up": (4864, 896),
    "qwen0.5b-mlp-down": (896, 4864),
    "qwen0.5b-q": (896, 896),
    "qwen0.5b-head": (151936, 896),
    "smollm2-head": (49152, 576),
    "qwen1.5b-mlp-up": (8960, 1536),
    "qwen1.5b-head": (151936, 1536),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small cases only (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()
    if not _native.AVAILABLE:
        raise SystemExit(f"native kernels unavailable ({_native.REASON}); build ivl._C first")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = {"qwen0.5b-q": SHAPES["qwen0.5b-q"]} if args.quick else SHAPES
    row_counts = (1, 16) if args.quick else (1, 4, 16, 32, 64)
    providers = {
        "torch-linear": lambda x, w: F.linear(x, w),
        "torch-weight-left": lambda x, w: (w @ x.T).T.contiguous(),
        "ivl-cpu": lambda x, w: torch.ops.ivl.narrow_linear(x, w, None),
    }
    bw = read_bandwidth()
    print(f"cpu read bandwidth: {bw:.1f} GB/s, {torch.get_num_threads()} threads")
    rows = []
    for shape, (n, k) in shapes.items():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g).to(dtype)
        for m in row_counts:
            x = torch.randn(m, k, generator=g).to(dtype)
            want = x.double() @ w.double().T
            ref_t = None
            for name, fn in providers.items():
                err = (fn(x, w).double() - want).abs().max().item()
                t = p50(lambda fn=fn, x=x, w=w: fn(x, w), reps=10, min_time=0.1)
                ref_t = ref_t or t
                row = dict(
                    op="linear",
                    shape=shape,
                    provider=name,
                    M=m,
                    N=n,
                    K=k,
                    dtype=args.dtype,
                    p50_ms=round(t * 1e3, 4),
                    weight_gbps=round(n * k * w.element_size() / t / 1e9, 2),
                    frac_read_bw=round(n * k * w.element_size() / t / 1e9 / bw, 3),
                    gflops=round(2 * m * n * k / t / 1e9, 1),
                    speedup_vs_torch_linear=round(ref_t / t, 2),
                    max_abs_err_vs_fp64=f"{err:.1e}",
                    read_bw_gbps=round(bw, 1),
                )
                rows.append(row)
                print(
                    f"{shape:<18} M={m:<3} {name:<18} {row['p50_ms']:>9.3f} ms "
                    f"{row['weight_gbps']:>6.2f} GB/s {row['gflops']:>6.1f} GFLOP/s "
                    f"x{row['speedup_vs_torch_linear']}"
                )
    print(f"appended {len(rows)} rows to {append_csv('linear', rows)}")


if __name__ == "__main__":
    main()
