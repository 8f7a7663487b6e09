"""``ivl eval``: one configuration on one task, or a whole experiment suite."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = ("gsm-symbolic", "nll", "jsonl")


def _alphas(text: str) -> list[float]:
    """``--alpha``: one value strength, or a comma-separated list (``--task nll`` scores them all
    in one teacher-forced pass: the way to choose alpha on validation demonstrations)."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a number or a comma-separated list: {text!r}"
        ) from None
    if not alphas:
        raise argparse.ArgumentTypeError("give at least one alpha")
    return alphas


def _single(args: argparse.Namespace) -> dict:
    from ivl.eval import harness
    from ivl.eval.metrics import resolve_scorer

    if not args.base:
        raise ValueError("give --base (and optionally --value), or --suite NAME")
    if args.task == "jsonl" and not args.data:
        raise ValueError("--task jsonl needs --data FILE.jsonl")
    if len(args.alpha) > 1 and args.task != "nll":
        raise ValueError(
            "several alphas need --task nll (one teacher-forced pass scores them all); "
            "generation tasks take one --alpha per run"
        )
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1 for a single task, got {args.limit}")
    scorer = resolve_scorer(args.scorer, allow_import=args.allow_custom_scorer)
    # the data before the models: a bad file fails at once, not after loading them
    if args.task == "nll" and args.data:
        from ivl.train.data import read_jsonl

        records = [rec for _, rec in read_jsonl(args.data)][: args.limit]
    elif args.task in ("nll", "gsm-symbolic"):
        records = harness.gsm_problems(args.limit or 200, seed=args.seed)
    else:
        items = harness.read_items(
            args.data, prompt_field=args.prompt_field, reference_field=args.reference_field
        )[: args.limit]
    spec = harness.ModelSpec(
        "cli",
        args.base,
        args.value,
        alpha=args.alpha[0],
        scheme=args.scheme,
        anti_expert=args.anti_expert,
        vocab_map=args.vocab_map,
        dtype=args.dtype,
    )
    model = spec.build()
    alpha = spec.effective_alpha()
    progress = not args.quiet
    out: dict = {"task": args.task, "base": args.base, "value": args.value, "alpha": alpha}
    if args.task == "nll":
        alphas = args.alpha if args.value else [0.0]
        results = harness.nll(model, records, alphas=alphas, progress=progress)
        rows = [{"alpha": a, "nll": r.nll, "perplexity": r.perplexity} for a, r in results.items()]
        res = next(iter(results.values()))  # every alpha scores the same tokens
        out.update(tokens=res.tokens, n=res.examples)
        out.update(rows[0] if len(rows) == 1 else {"alpha": list(results), "results": rows})
        return out
    if args.task == "gsm-symbolic":
        items = [(r["prompt"], r["answer"]) for r in records]
        scorer = resolve_scorer("numeric") if args.scorer == "exact" else scorer
    ev = harness.generate_eval(
        model,
        items,
        scorer=scorer,
        alpha=alpha,
        max_new_tokens=args.max_new_tokens or 256,
        max_batch=args.max_batch or 8,
        raw_prompts=args.raw_prompts,
        progress=progress,
    )
    if args.predictions:
        harness.write_predictions(Path(args.predictions), ev)
    out.update(ev.summary())
    return out


def _eval(args: argparse.Namespace) -> int:
    if args.suite:
        from ivl.eval.suite import run_suite

        rows = run_suite(
            args.suite,
            out_dir=args.out,
            runs_dir=args.runs,
            only=args.only,
            progress=not args.quiet,
            resume=args.resume,
            accuracy_problems=args.limit,
            nll_examples=args.nll_examples,
            max_new_tokens=args.max_new_tokens,
            train_steps=args.train_steps,
            train_examples=args.train_examples,
            max_batch=args.max_batch,
        )
        from ivl.eval.report import markdown_table

        print(markdown_table(rows))
        print(f"report written under {args.out}")
        return 0
    out = _single(args)
    if args.json:
        print(json.dumps(out))
        return 0
    if "accuracy" in out:
        print(
            f"accuracy {100 * out['accuracy']:.1f}% (95% CI {100 * out['ci_low']:.1f}-"
            f"{100 * out['ci_high']:.1f}) over {out['n']} ({out['task']}, alpha {out['alpha']}); "
            f"{out['generated_tokens']} tokens in {out['seconds']:.1f}s"
        )
    else:
        for r in out.get("results", [out]):
            print(
                f"NLL {r['nll']:.4f} nats/token (perplexity {r['perplexity']:.3f}) over "
                f"{out['tokens']} tokens of {out['n']} examples (alpha {r['alpha']})"
            )
    sys.stdout.flush()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ivl eval`` to the ``ivl`` command's subparsers."""
    from ivl.engine.model import SCHEMES

    p = sub.add_parser(
        "eval",
        help="evaluate base / base + value / proxy-tuning / fine-tuned configurations",
        description="Evaluate one configuration on one task, or run an experiment suite "
        "(docs/eval.md).",
    )
    m = p.add_argument_group("one configuration")
    m.add_argument("--base", help="zoo name or HF folder of the base model")
    m.add_argument("--value", default=None, help="value model folder (none: the base alone)")
    m.add_argument(
        "--alpha",
        type=_alphas,
        default=[1.0],
        help="value strength (default 1); --task nll takes a list, e.g. 0,0.5,1,2",
    )
    m.add_argument("--scheme", default="residual", choices=SCHEMES)
    m.add_argument("--anti-expert", default=None, help="proxy-tuning: the untuned small model")
    m.add_argument("--vocab-map", default=None, help="'auto' or a vocabulary map file")
    m.add_argument(
        "--dtype",
        default=None,
        help="weights dtype (default: bfloat16 where it is fast, else float32)",
    )
    m.add_argument("--task", default="gsm-symbolic", choices=TASKS)
    m.add_argument("--data", default=None, help="JSONL: prompts+references (jsonl), demos (nll)")
    m.add_argument("--prompt-field", default="prompt")
    m.add_argument("--reference-field", default="reference")
    m.add_argument(
        "--scorer",
        default="exact",
        help="exact | numeric | module:function (needs --allow-custom-scorer)",
    )
    m.add_argument(
        "--allow-custom-scorer",
        action="store_true",
        help="allow --scorer module:function (imports and runs that module)",
    )
    m.add_argument("--raw-prompts", action="store_true", help="no chat / plain template")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (suite: its own)")
    p.add_argument("--max-batch", type=int, default=None, help="concurrent requests (default 8)")
    m.add_argument("--seed", type=int, default=0, help="gsm-symbolic problem seed")
    m.add_argument("--predictions", default=None, help="write predictions as JSONL here")
    m.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s = p.add_argument_group("suite")
    s.add_argument(
        "--suite",
        default=None,
        help="a built-in suite (transfer, transfer-cpu, same-family-cpu) or a suite JSON file",
    )
    s.add_argument("--only", action="append", help="run only this experiment (repeatable)")
    s.add_argument("--out", default="docs/results", help="report folder (default docs/results)")
    s.add_argument("--runs", default="runs/suite", help="trained artefacts (default runs/suite)")
    s.add_argument(
        "--resume",
        action="store_true",
        help="keep the configurations an earlier run of this suite finished (OUT/NAME.evaluated.json)",
    )
    s.add_argument("--nll-examples", type=int, default=None)
    s.add_argument("--train-steps", type=int, default=None)
    s.add_argument("--train-examples", type=int, default=None)
    p.add_argument(
        "--limit", type=int, default=None, help="problems / records to evaluate (suite: accuracy)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)
