"""Batch inference on Ray (``ivl batch``) against calling the engine directly, side by side.

Same tiny models (saved to a temp folder), same prompts, greedy with ignore_eos so every row
makes exactly ``--new-tokens`` tokens; one CPU thread per engine:

- ``engine``: ``IVLEngine.generate_many`` in this process (``fixed_s`` = model loading);
- ``ray-1w`` / ``ray-2w``: :func:`ivl.batch.run_batch` with 1 or 2 actors on a Ray started once
  by this script (``ray-init`` row: its start-up time). Each run starts its actors (process,
  imports, model loading), streams batches, writes part files and merges them.
  ``fixed_s`` = time from the call to the first part file (actor start-up + one batch);
  ``steady_rows_s`` = rows after the first part / time from the first part to the last one:
  throughput once the actors are up (from the part files' modification times).

``rows_s`` = rows / wall time. ``overhead_s`` = wall - (the engine's model load + generation):
what the Ray path costs on top of doing the same work in one process.

    flock /tmp/ivl-heavy.lock python benchmarks/bench_batch.py            # appends to batch.csv
    python benchmarks/bench_batch.py --rows 32 --new-tokens 4 --no-csv      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import append_csv


def _prompts(n: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum"
    words = words.split(" ")
    return [" ".join(words[(i + k) % len(words)] for k in range(4 + i % 9)) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per Ray batch")
    ap.add_argument("--max-batch", type=int, default=8, help="rows decoded at once per engine")
    ap.add_argument("--workers", default="1,2", help="actor counts to run")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The actors import ivl from this checkout even when it is not pip-installed.
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p
    )
    import ray
    import torch

    from ivl.batch import run_batch
    from ivl.batch.io import PartStore
    from ivl.batch.pipeline import init_ray
    from ivl.engine import IVLEngine, IVLModel, SamplingParams
    from ivl.models.tiny import save_tiny

    torch.set_num_threads(1)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    prompts = _prompts(args.rows)
    common = dict(
        model="tiny-llama+tiny-llama",
        rows=args.rows,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        max_batch=args.max_batch,
        threads_per_worker=1,
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = save_tiny(tmp / "base", "llama", "gpt2", seed=0, initializer_range=0.5)
        value = save_tiny(tmp / "value", "llama", "gpt2", seed=1, initializer_range=0.5)
        with open(tmp / "in.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)

        t0 = time.perf_counter()
        engine = IVLEngine(IVLModel.from_pretrained(base, value), max_batch=args.max_batch)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        reference = engine.generate_many(prompts, params)
        gen_s = time.perf_counter() - t0
        direct = load_s + gen_s
        results.append(
            dict(
                provider="engine",
                workers=0,
                wall_s=gen_s,
                rows_s=args.rows / gen_s,
                fixed_s=load_s,
                steady_rows_s=args.rows / gen_s,
                overhead_s=0.0,
                note="in-process generate_many; fixed_s = model load",
            )
        )
        del engine

        t0 = time.perf_counter()
        init_ray(num_cpus=2)
        results.append(
            dict(provider="ray-init", workers=0, wall_s=time.perf_counter() - t0, note="ray.init")
        )
        try:
            for w in (int(x) for x in args.workers.split(",")):
                out = tmp / f"out-{w}.jsonl"
                start = time.time()
                summary = run_batch(
                    tmp / "in.jsonl",
                    out,
                    base=base,
                    value=value,
                    params=params,
                    workers=w,
                    batch_size=args.batch_size,
                    max_batch=args.max_batch,
                    progress=False,
                )
                wall = time.time() - start
                assert summary.generated == args.rows and summary.errors == 0, summary
                parts = [(p.stat().st_mtime, len(p.read_text().splitlines())) for p in
                         PartStore(out).parts()]  # fmt: skip
                parts.sort()
                steady = (args.rows - parts[0][1]) / max(parts[-1][0] - parts[0][0], 1e-9)
                texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
                same = texts == [r.text for r in reference]
                results.append(
                    dict(
                        provider=f"ray-{w}w",
                        workers=w,
                        wall_s=wall,
                        rows_s=args.rows / wall,
                        fixed_s=parts[0][0] - start,
                        steady_rows_s=steady if len(parts) > 1 else "",
                        overhead_s=wall - direct,
                        note="outputs == engine" if same else "OUTPUTS DIFFER FROM THE ENGINE",
                    )
                )
        finally:
            ray.shutdown()

    engine_rate = results[0]["rows_s"]
    rows = []
    for r in results:
        r = {**common, **r}
        steady = r.get("steady_rows_s")
        r["speedup_vs_engine"] = steady / engine_rate if isinstance(steady, float) else ""
        rows.append(r)
    keys = ["provider", "workers", "wall_s", "rows_s", "fixed_s", "steady_rows_s"]
    keys += ["speedup_vs_engine", "overhead_s", "note"]
    for r in rows:
        print("  ".join(f"{k}={_fmt(r.get(k, ''))}" for k in keys))
    if not args.no_csv:
        cols = ["provider", *common, *keys[1:]]
        path = append_csv("batch", [{c: _fmt(r.get(c, "")) for c in cols} for r in rows])
        print(f"appended {len(rows)} rows to {path}")


def _fmt(x):
    return round(x, 4) if isinstance(x, float) else x


if __name__ == "__main__":
    main()
