"""merge_logits: the pure-PyTorch reference vs the native kernel, side by side.

    python -m benchmarks.bench_merge_logits [--quick]

Reports p50 time, effective bandwidth (bytes of logits read + written / time) as a fraction of
the machine's measured read bandwidth, and the speed-up over the reference. Appends CSV rows to
benchmarks/results/merge_logits.csv.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import append_csv, p50, read_bandwidth
from ivl.ops import _native, reference
from ivl.ops import merge_logits as public_merge_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size only (smoke run)")
    parser.add_argument("--gpu", action="store_true", help="CUDA tensors: ivl-cuda and ivl-triton")
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"

    sizes = [(8, 32000)] if args.quick else [(1, 32000), (8, 32000), (32, 151936), (8, 262144)]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    providers = {"torch-reference": reference.merge_logits}
    if _native.AVAILABLE and (device == "cpu" or _native.HAS_CUDA):
        providers[f"ivl-{device}"] = public_merge_logits
    else:
        print(f"native {device} kernels unavailable ({_native.REASON or 'not built'})")
    if args.gpu:
        from ivl.ops import triton as ivl_triton

        providers["ivl-triton"] = ivl_triton.merge_logits

    bw = read_bandwidth(device=device)
    print(f"{device} read bandwidth: {bw:.1f} GB/s")
    rows = []
    for b, v in sizes:
        for dtype in dtypes:
            for mapped in (False, True):
                g = torch.Generator().manual_seed(0)
                base = torch.randn(b, v, generator=g).to(device=device, dtype=dtype)
                value = torch.randn(b, v, generator=g).to(device=device, dtype=dtype)
                kw = dict(alpha=0.8, vocab_limit=v - 7)
                if mapped:
                    perm, weight = torch.randperm(v, generator=g), torch.rand(v, generator=g)
                    kw["vocab_map"] = (perm.to(device), weight.to(device))
                nbytes = 2 * base.numel() * base.element_size() + 4 * base.numel()
                ref_t = None
                for name, fn in providers.items():
                    t = p50(
                        lambda fn=fn, base=base, value=value, kw=kw: fn(base, value, **kw),
                        device=device,
                    )
                    ref_t = ref_t or t
                    row = dict(
                        op="merge_logits",
                        provider=name,
                        B=b,
                        V=v,
                        dtype=str(dtype)[6:],
                        remap=mapped,
                        p50_ms=round(t * 1e3, 4),
                        gbps=round(nbytes / t / 1e9, 2),
                        frac_read_bw=round(nbytes / t / 1e9 / bw, 3),
                        speedup_vs_reference=round(ref_t / t, 2),
                        read_bw_gbps=round(bw, 1),
                    )
                    rows.append(row)
                    print(
                        f"B={b:<3} V={v:<6} {row['dtype']:<8} remap={mapped!s:<5} {name:<16} "
                        f"{row['p50_ms']:>9.3f} ms {row['gbps']:>7.2f} GB/s "
                        f"x{row['speedup_vs_reference']}"
                    )
    print(f"appended {len(rows)} rows to {append_csv('merge_logits', rows)}")


if __name__ == "__main__":
    main()
