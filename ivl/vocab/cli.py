"""``ivl vocab build|check``: build a vocabulary map between two tokenizers, report its coverage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ivl.vocab.map import KINDS

SAMPLE = "Hello, world!  The answer is 42.\n\ndef f(x):\n    return x ** 2  # 日本語 café"


def _columns(spec: str, given: int | None) -> int | None:
    """Output columns of a model (its config's vocab_size) when known without loading weights."""
    if given is not None:
        return given
    from ivl.models import zoo

    folder = zoo.default_cache_dir() / spec if spec in zoo.MODELS else Path(spec)
    cfg = folder / "config.json"
    if cfg.is_file():
        raw = json.loads(cfg.read_text())
        raw = raw.get("text_config", raw) if "vocab_size" not in raw else raw
        if raw.get("vocab_size"):
            return int(raw["vocab_size"])
    return None


def _build(args: argparse.Namespace) -> int:
    from ivl.models.loading import load_tokenizer
    from ivl.vocab.corpus import corpus_texts
    from ivl.vocab.map import build_map

    base_tok, value_tok = load_tokenizer(args.base), load_tokenizer(args.value)
    corpus = None
    if args.kind == "dtw" or (args.kind == "auto" and args.corpus):
        corpus = corpus_texts(args.corpus or "gsm-symbolic", max_chars=args.corpus_chars)
    vmap = build_map(
        base_tok,
        value_tok,
        kind=args.kind,
        base_columns=_columns(args.base, args.base_columns),
        value_columns=_columns(args.value, args.value_columns),
        corpus=corpus,
        progress=not args.quiet,
    )
    vmap.meta["base"]["name"], vmap.meta["value"]["name"] = args.base, args.value
    path = vmap.save(args.out)
    st = vmap.meta["stats"]
    print(
        f"{path}: {vmap.kind} map, {st['mapped']:,} of {vmap.base_size:,} base tokens mapped, "
        f"built in {st['build_seconds']:.1f}s, {vmap.nbytes() / 1e6:.1f} MB"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from ivl.models.loading import load_tokenizer
    from ivl.vocab.corpus import corpus_texts
    from ivl.vocab.map import VocabMap
    from ivl.vocab.report import coverage, split_sample

    vmap = VocabMap.load(args.map)
    base = args.base or vmap.meta.get("base", {}).get("name")
    value = args.value or vmap.meta.get("value", {}).get("name")
    if not base or not value:
        raise ValueError("the map does not name its models: pass --base and --value")
    base_tok, value_tok = load_tokenizer(base), load_tokenizer(value)
    vmap.check(base_tok, value_tok)
    cov = coverage(vmap, base_tok, corpus_texts(args.corpus, max_chars=args.corpus_chars))
    print(f"map: {vmap!r}")
    print(f"base tokens mapped: {cov['vocab_share']:.1%} of the vocabulary")
    print(
        f"corpus coverage ({args.corpus}, {cov['corpus_tokens']:,} base tokens): "
        f"{cov['corpus_share']:.1%} of token occurrences mapped"
    )
    if cov["unmapped_examples"]:
        shown = ", ".join(f"{t!r} x{c}" for t, c in cov["unmapped_examples"][:15])
        print(f"most frequent unmapped base tokens: {shown}")
    text = args.sample or SAMPLE
    print(f"sample: {text!r}")
    for side, tok in (("base", base_tok), ("value", value_tok)):
        pieces = split_sample(tok, text)
        print(f"  {side:5} ({len(pieces)} tokens): {' | '.join(repr(p)[1:-1] for p in pieces)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vocab", help="vocabulary maps for a value model with another tokenizer")
    vsub = p.add_subparsers(dest="vocab_command", metavar="ACTION", required=True)
    corpus_help = "gsm-symbolic, sharegpt, or a .txt / .jsonl file (offline)"

    b = vsub.add_parser("build", help="build a map from the base's to the value's vocabulary")
    b.add_argument("--base", required=True, help="base model: zoo name or HF folder")
    b.add_argument("--value", required=True, help="value model: zoo name or HF folder")
    b.add_argument("--out", required=True, help="folder to write the map to")
    b.add_argument("--kind", default="auto", choices=KINDS, help="how to match tokens")
    b.add_argument("--corpus", default=None, help=f"texts for dtw: {corpus_help}")
    b.add_argument("--corpus-chars", type=int, default=1_000_000, help="corpus size to use")
    b.add_argument("--base-columns", type=int, default=None, help="base output columns")
    b.add_argument("--value-columns", type=int, default=None, help="value output columns")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)

    c = vsub.add_parser("check", help="coverage of a map on a corpus and a sample split")
    c.add_argument("map", help="folder written by `ivl vocab build`")
    c.add_argument("--base", default=None, help="base model (default: the one the map names)")
    c.add_argument("--value", default=None, help="value model (default: the one the map names)")
    c.add_argument("--corpus", default="gsm-symbolic", help=corpus_help)
    c.add_argument("--corpus-chars", type=int, default=200_000, help="corpus size to use")
    c.add_argument("--sample", default=None, help="a text to show both tokenizations of")
    c.set_defaults(func=_check)
