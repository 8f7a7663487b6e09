"""``ivl batch``: generate for a JSONL/Parquet dataset of prompts on Ray (see docs/scaling.md).

Hooked into ``ivl/cli.py`` with ``register(subparsers)``. Exit code 0 when every row finished,
1 when some rows went to the errors file, 2 on a usage error.
"""

from __future__ import annotations

import argparse


def _batch(args: argparse.Namespace) -> int:
    from ivl.batch.pipeline import run_batch
    from ivl.engine.cli import _params

    summary = run_batch(
        args.input,
        args.output,
        base=args.base,
        value=args.value,
        anti_expert=args.anti_expert,
        vocab_map=args.vocab_map,
        scheme=args.scheme,
        dtype=args.dtype,
        device=args.device,
        params=_params(args, seed=None),  # --seed is the base of the per-row seeds here
        seed=args.seed,
        chat=args.chat,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        batch_size=args.batch_size,
        max_batch=args.max_batch,
        max_len=args.max_len,
        address=args.address,
        errors=args.errors,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    msg = f"wrote {summary.skipped + summary.generated} rows to {summary.output}"
    if summary.skipped:
        msg += f" ({summary.skipped} from earlier runs)"
    if summary.generated:
        msg += f"; {summary.generated} rows in {summary.seconds:.1f} s"
    print(msg)
    if summary.errors:
        print(f"{summary.errors} rows failed: see {summary.errors_path}")
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ivl batch`` to the ``ivl`` command's subparsers."""
    from ivl.engine.cli import add_sampling_args

    p = sub.add_parser(
        "batch",
        help="generate for a JSONL/Parquet dataset of prompts on Ray (resumable)",
        description=(
            "Batch generation on a Ray Data actor pool, one engine per worker. Results are "
            "written as they finish to OUTPUT.parts/ and merged in input order into OUTPUT; a "
            "rerun skips finished ids. Rows: {'id': ..., 'prompt': ...} or {'messages': [...]}, "
            "with optional per-row sampling overrides."
        ),
    )
    p.add_argument("--input", required=True, help="dataset: .jsonl or .parquet")
    p.add_argument("--output", required=True, help="results, JSONL in input order")
    p.add_argument(
        "--errors", default=None, help="bad rows and failed generations (default OUT.errors.jsonl)"
    )
    p.add_argument("--base", required=True, help="zoo name or HF folder of the base LM")
    p.add_argument("--value", default=None, help="zoo name or folder of the value network")
    p.add_argument("--anti-expert", default=None, help="proxy-tuning: the untuned small model")
    p.add_argument("--vocab-map", default=None, help="map folder from `ivl vocab build`, or auto")
    p.add_argument(
        "--scheme",
        default="residual",
        choices=("residual", "cascade", "cascade_no_text", "proxy"),
        help="how the value network sees its input (default: residual)",
    )
    p.add_argument("--chat", action="store_true", help="apply the chat template to text prompts")
    add_sampling_args(
        p, seed_default=0, seed_help="base of the per-row seeds (derived from row ids)"
    )
    p.add_argument("--workers", type=int, default=1, help="Ray actors, one engine each")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="Ray CPUs per actor")
    p.add_argument(
        "--gpus-per-worker", type=float, default=0, help="Ray GPUs per actor (1: one per GPU)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="rows per Ray batch / part file")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded at once per engine")
    p.add_argument("--max-len", type=int, default=None, help="positions per request slot")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="default: the actor's GPU if any, else cpu")
    p.add_argument(
        "--address", default=None, help="existing Ray cluster (auto or HOST:PORT); default: local"
    )
    p.add_argument("--overwrite", action="store_true", help="discard earlier results of OUTPUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_batch)
