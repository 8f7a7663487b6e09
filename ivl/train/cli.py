"""``ivl train``: train a value network against a frozen base (see ivl.train.trainer)."""

from __future__ import annotations

import argparse


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    for conv in (int, float):
        try:
            return key, conv(raw)
        except ValueError:
            pass
    return key, raw


def _init_distributed() -> None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1), join the process group."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _train(args: argparse.Namespace) -> int:
    import os

    from ivl.train.trainer import TrainConfig, train_value

    _init_distributed()
    cfg = TrainConfig(
        out_dir=args.out,
        scheme=args.scheme,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        base_dtype=args.base_dtype,
        device=args.device,
        # `accelerate launch` with an FSDP config (examples/accelerate/fsdp.yaml) sets this
        shard_base=args.shard_base or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true",
        seed=args.seed,
        lam=args.lam,
        masked=args.masked,
        max_length=args.max_length,
        truncation=args.truncation,
        eval_fraction=args.eval_fraction,
        eval_examples=args.eval_examples,
        eval_every=args.eval_every,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        progress=not args.quiet,
        resume=args.resume,
        overwrite=args.overwrite,
        extra=dict(args.recipe_option or []),
    )
    value_init = args.value_init or args.base
    out = train_value(args.base, value_init, args.data, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ivl train`` to the ``ivl`` command's subparsers."""
    from ivl.train.recipes import RECIPES
    from ivl.train.schemes import SCHEMES

    p = sub.add_parser(
        "train",
        help="train a value network against a frozen base model",
        description="Train a value network so that softmax(z_base + z_value) fits demonstrations.",
    )
    p.add_argument("--base", required=True, help="zoo name or HF folder of the frozen base")
    p.add_argument(
        "--value-init",
        default=None,
        help="zoo name / HF folder, 'random', 'random-N-layers', 'first-N-layers' or "
        "'first-N-layers:MODEL' (default: the base checkpoint)",
    )
    p.add_argument(
        "--data",
        required=True,
        help=f"JSONL file of prompt/response or messages records, or a recipe: "
        f"{', '.join(RECIPES)}",
    )
    p.add_argument("--out", required=True, help="output folder (artefact, checkpoints, metrics)")
    p.add_argument("--scheme", default="residual", choices=SCHEMES)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=3.0)
    g.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.01)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for compute")
    g.add_argument("--base-dtype", default=None, help="e.g. bfloat16 (default: as stored)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    g.add_argument(
        "--shard-base",
        action="store_true",
        help="with several processes: shard the frozen base's layers (FSDP2); on by default "
        "under accelerate launch with an FSDP config",
    )
    g = p.add_argument_group("loss")
    g.add_argument("--lam", type=float, default=1.0, help="norm penalty weight")
    g.add_argument("--masked", action="store_true", help="penalty over supervised positions only")
    g = p.add_argument_group("data")
    g.add_argument("--max-length", type=int, default=2048)
    g.add_argument("--truncation", default="right", choices=("right", "left", "drop", "error"))
    g.add_argument("--eval-fraction", type=float, default=0.0)
    g.add_argument("--eval-examples", type=int, default=None)
    g.add_argument(
        "--recipe-option",
        action="append",
        type=_parse_option,
        metavar="KEY=VALUE",
        help="recipe option, e.g. train_examples=500 (repeatable)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--save-every", type=int, default=0)
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start over in a used --out")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
