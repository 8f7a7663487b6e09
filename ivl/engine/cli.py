"""``ivl generate``: base + value generation from the command line.

One prompt (``--prompt``) streams its text to stdout; a JSONL file (``--input``) is generated
with continuous batching behind a progress bar and written to ``--output`` (JSONL, input order).

Input lines: ``{"prompt": "..."}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``,
optionally with per-line overrides of the sampling flags (``max_new_tokens``, ``temperature``,
``top_k``, ``top_p``, ``min_p``, ``alpha``, ``seed``, ``stop``); other keys (e.g. ``id``) are
copied to the output line, which adds ``text``, ``finish_reason``, ``tokens`` and ``error``.

Hooked into ``ivl/cli.py`` with ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

_OVERRIDES = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "alpha", "seed", "stop")


def add_sampling_args(p: argparse.ArgumentParser, *, seed_default, seed_help: str) -> None:
    """The sampling options of ``ivl generate`` and ``ivl batch`` (read back by :func:`_params`)."""
    from ivl.engine.params import SamplingParams

    d = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    p.add_argument("--alpha", type=float, default=d["alpha"], help="value strength (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="0 = off")
    p.add_argument("--top-p", type=float, default=d["top_p"], help="1 = off")
    p.add_argument("--min-p", type=float, default=d["min_p"], help="0 = off")
    p.add_argument("--seed", type=int, default=seed_default, help=seed_help)
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"])
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")


def _params(args: argparse.Namespace, **overrides):
    from ivl.engine.params import SamplingParams

    base = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        alpha=args.alpha,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )
    return SamplingParams(**{**base, **overrides})


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
            if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
                raise ValueError(
                    f'{path}:{n}: each line needs exactly one of "prompt" or "messages"'
                )
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def _generate(args: argparse.Namespace) -> int:
    import torch

    from ivl._fs import atomic_write_text
    from ivl.engine.engine import IVLEngine
    from ivl.engine.model import IVLModel

    if (args.prompt is None) == (args.input is None):
        raise ValueError("give exactly one of --prompt TEXT or --input prompts.jsonl")
    if args.input is not None and args.output is None:
        raise ValueError("--input needs --output out.jsonl")
    # sampling settings and the prompts file are checked before any model is loaded
    if args.prompt is not None:
        params = _params(args)
    else:
        rows = _read_jsonl(Path(args.input))
        prompts, params = [], []
        for n, row in enumerate(rows, 1):
            prompts.append(row.get("prompt", row.get("messages")))
            try:
                params.append(_params(args, **{k: row[k] for k in _OVERRIDES if k in row}))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{args.input}:{n}: {e}") from None
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = IVLModel.from_pretrained(
        args.base,
        args.value,
        dtype=dtype,
        scheme=args.scheme,
        anti_expert=args.anti_expert,
        vocab_map=args.vocab_map,
        device=args.device,
    )
    engine = IVLEngine(model, max_batch=args.max_batch, max_len=args.max_len)

    if args.prompt is not None:
        result = None
        for event in engine.stream([args.prompt], params, chat=args.chat):
            sys.stdout.write(event.text_delta)
            sys.stdout.flush()
            result = event.result or result
        sys.stdout.write("\n")
        if result is not None and result.error is not None:
            raise ValueError(result.error)
        return 0

    chat = args.chat or any("messages" in r for r in rows)
    results = engine.generate_many(prompts, params, chat=chat, progress=not args.quiet)
    lines = []
    for row, res in zip(rows, results, strict=True):
        rec = {k: v for k, v in row.items() if k not in _OVERRIDES}
        rec.update(
            text=res.text,
            finish_reason=res.finish_reason,
            tokens=len(res.token_ids),
            error=res.error,
        )
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_write_text(out, "".join(lines))
    failed = sum(res.error is not None for res in results)
    print(f"wrote {len(results)} results to {out}" + (f" ({failed} failed)" if failed else ""))
    return 1 if failed == len(results) else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ivl generate`` to the ``ivl`` command's subparsers."""
    p = sub.add_parser(
        "generate",
        help="generate with a base model steered by a value network",
        description="z = z_base + alpha * z_value; a single --prompt streams, --input batches.",
    )
    p.add_argument("--base", required=True, help="zoo name or local HF folder of the base LM")
    p.add_argument("--value", default=None, help="zoo name or folder of the value network")
    p.add_argument("--anti-expert", default=None, help="proxy-tuning: the untuned small model")
    p.add_argument(
        "--vocab-map",
        default=None,
        help="value model with another tokenizer: a map folder from `ivl vocab build`, or auto",
    )
    p.add_argument(
        "--scheme",
        default="residual",
        choices=("residual", "cascade", "cascade_no_text", "proxy"),
        help="how the value network sees its input (default: residual)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one prompt; its text streams to stdout")
    src.add_argument(
        "--input", default=None, help='JSONL with {"prompt": ...} or {"messages": ...}'
    )
    p.add_argument("--output", default=None, help="JSONL results (with --input)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    add_sampling_args(p, seed_default=None, seed_help="default: derived per prompt index")
    p.add_argument("--max-batch", type=int, default=8, help="concurrent requests (default 8)")
    p.add_argument("--max-len", type=int, default=None, help="positions per request slot")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="e.g. cuda; default: cpu")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_generate)
