"""`ivl demo` (what `make demo` runs): train a value network, transfer it to another base.

1. fetch the zoo models it needs (install, verify, convert; cached after the first time);
2. train a value network for a few minutes on GSM-Symbolic demonstrations against a frozen
   training base (:func:`ivl.train.train_value`);
3. evaluate the training base alone and + value: held-out NLL of demonstrations and greedy
   accuracy, on problems of the recipe's HELD-OUT templates (never trained on);
4. plug the same value network, unchanged, into a second, different base (the transfer base;
   through a vocabulary map when its tokenizer differs) and evaluate it the same way;
5. print the before/after table and one answer side by side, write ``demo.csv``/``.md``/``.png``.

Default pair: SmolLM2-135M-Instruct (training base; the value is a fresh 2-layer network of its
architecture) -> Qwen2.5-Coder-0.5B-Instruct (transfer base, another family and tokenizer, so
``vocab_map="auto"``). A same-tokenizer pair (Qwen-0.5B -> Qwen-1.5B) does not fit 20 minutes on
two CPU cores (the 1.5B decodes ~2.7 tokens/s). Every size is a :class:`DemoConfig` field, so
tests run the same code path on tiny models.
"""

from __future__ import annotations

import dataclasses
import logging
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("ivl")

TRAIN_BASE = "smollm2-135m-instruct"
TRANSFER_BASE = "qwen2.5-coder-0.5b-instruct"


@dataclass
class DemoConfig:
    """Everything the demo does; the defaults fit ~20 minutes on this 2-core CPU."""

    train_base: str = TRAIN_BASE
    transfer_base: str = TRANSFER_BASE
    # A small value network starting near z_value = 0 (a freshly initialised 2-layer copy of the
    # training base's architecture): cheap to train on a CPU, and it cannot hurt the base before
    # it has learnt something. (`--value-init smollm2-135m-instruct`: the paper's pretrained init.)
    value_init: str = "random-2-layers"
    vocab_map: Any = "auto"  # only used when the transfer base's tokenizer differs
    train_examples: int = 400
    train_steps: int | None = None  # fixed step count; None: fit train_minutes
    train_minutes: float = 5.0
    calib_steps: int = 2  # steps timed to choose the step count
    max_train_steps: int = 300
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    max_length: int = 384
    n_accuracy: int = 16
    n_nll: int = 32
    max_new_tokens: int = 160
    max_batch: int = 8
    dtype: str | None = None  # None: bfloat16 where it is fast, else float32
    seed: int = 0
    out_dir: str = "runs/demo"
    progress: bool = True
    extra_train: dict = field(default_factory=dict)  # more TrainConfig fields


@dataclass
class DemoResult:
    rows: list[dict]
    value_dir: Path
    files: list[Path]
    sample: dict


def _step(i: int, text: str) -> float:
    print(f"\n[{i}/5] {text}", flush=True)
    return time.perf_counter()


def _same_tokenizer(a: str, b: str) -> bool:
    from ivl.models.loading import load_tokenizer

    ta, tb = load_tokenizer(a), load_tokenizer(b)
    return len(ta) == len(tb) and ta.get_vocab() == tb.get_vocab()


def _evaluate(spec, problems, cfg: DemoConfig, label: str) -> tuple[list[dict], list]:
    """Rows (alone, + value) for one base, and the two prediction lists."""
    from ivl.eval import harness

    model = spec.build()
    nlls = harness.nll(
        model,
        problems[: cfg.n_nll],
        alphas=(0.0, spec.alpha),
        max_length=cfg.max_length,
        progress=cfg.progress,
    )
    items = [(r["prompt"], r["answer"]) for r in problems[: cfg.n_accuracy]]
    rows, preds = [], []
    for name, alpha in (("alone", 0.0), ("+ value", spec.alpha)):
        ev = harness.generate_eval(
            model,
            items,
            scorer="numeric",
            alpha=alpha,
            max_new_tokens=cfg.max_new_tokens,
            max_batch=cfg.max_batch,
            progress=cfg.progress,
        )
        res = nlls[float(alpha)]
        rows.append(
            {
                "experiment": label,
                "config": f"{Path(str(spec.base)).name} {name}",
                "base": str(spec.base),
                "value": str(spec.value) if alpha else "",
                "alpha": alpha,
                "n_acc": ev.n,
                "accuracy": ev.accuracy,
                "ci_low": ev.ci_low,
                "ci_high": ev.ci_high,
                "n_nll": res.examples,
                "nll": res.nll,
                "ppl": res.perplexity,
                "gen_tokens": ev.generated_tokens,
                "wall_s": round(ev.seconds, 1),
            }
        )
        preds.append(ev.predictions)
    return rows, preds


def _table(rows: list[dict]) -> str:
    from ivl.cli import _table as fmt

    body = [
        (
            r["experiment"],
            r["config"],
            f"{100 * r['accuracy']:.1f}% [{100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f}]",
            f"{r['nll']:.3f}",
            f"{r['ppl']:.2f}",
        )
        for r in rows
    ]
    n_acc, n_nll = rows[0]["n_acc"], rows[0]["n_nll"]
    head = ("BASE ROLE", "CONFIGURATION", f"ACCURACY N={n_acc} (95% CI)", f"NLL N={n_nll}", "PPL")
    return fmt(body, head)


def _side_by_side(left: str, right: str, titles: tuple[str, str], width: int = 50) -> str:
    def wrap(t):
        out = []
        for para in t.strip().splitlines() or [""]:
            out += textwrap.wrap(para, width) or [""]
        return out

    a, b = wrap(left), wrap(right)
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    lines = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    lines += [f"{x:<{width}} | {y}" for x, y in zip(a, b, strict=True)]
    return "\n".join(lines)


class _Calibrated(Exception):
    """Raised by the demo's training callback once the timed steps are done."""


def _train(cfg: DemoConfig, value_dir: Path) -> int:
    """Train the value network; return the number of optimizer steps.

    With ``train_steps`` set, exactly that many. Otherwise a time budget: a run planned for
    ``max_train_steps`` checkpoints every step and is stopped after ``calib_steps`` timed steps
    (a callback raising stops it like a kill; the checkpoint stays resumable), then it resumes
    from that checkpoint (same data order, exact resume) up to the step count that fits
    ``train_minutes`` in total. The timed steps are real training steps.
    """
    from ivl.train import TrainConfig, train_value

    def config(max_steps: int, resume: bool, save_every: int = 0) -> TrainConfig:
        return TrainConfig(
            out_dir=str(value_dir),
            max_steps=max_steps,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            lr=cfg.lr,
            warmup_ratio=0.0,  # constant-then-cosine: the first steps count
            max_length=cfg.max_length,
            bf16=cfg.dtype == "bfloat16",
            base_dtype=cfg.dtype,
            seed=cfg.seed,
            save_every=save_every,
            keep_checkpoints=1,
            overwrite=not resume,
            resume=resume,
            progress=cfg.progress,
            extra={"train_examples": cfg.train_examples, "seed": cfg.seed},
            **cfg.extra_train,
        )

    data = "gsm-symbolic"
    if cfg.train_steps:
        train_value(cfg.train_base, cfg.value_init, data, config(cfg.train_steps, False))
        return cfg.train_steps
    t0, stamps = time.perf_counter(), []

    def timer(row: dict) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) >= cfg.calib_steps:
            raise _Calibrated

    try:
        plan = config(cfg.max_train_steps, False, save_every=1)
        train_value(cfg.train_base, cfg.value_init, data, plan, callbacks=[timer])
    except _Calibrated:
        pass
    if len(stamps) >= 2:  # the time between optimizer steps (no loading)
        per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    else:
        per_step = time.perf_counter() - t0
    left = cfg.train_minutes * 60 - (time.perf_counter() - t0)
    steps = len(stamps) + max(0, int(left / max(per_step, 1e-3)))
    steps = max(len(stamps), min(cfg.max_train_steps, steps))
    print(f"  ~{per_step:.1f}s per step here: {steps} steps fit {cfg.train_minutes:g} minutes")
    # Resuming also writes the artefact when no step is left to run.
    train_value(cfg.train_base, cfg.value_init, data, config(steps, True))
    return steps


def _pick_sample(alone: list, steered: list):
    """The pair to show: the value fixing an answer if it did, else any change, else the first."""
    pairs = list(zip(alone, steered, strict=True))
    for want in (lambda a, s: s.score > a.score, lambda a, s: a.text != s.text):
        for a, s in pairs:
            if want(a, s):
                return a, s
    return pairs[0]


def run(cfg: DemoConfig | None = None) -> DemoResult:
    """Run the demo (see module docstring); returns the rows, the value folder and the files."""
    from ivl.eval import harness, report
    from ivl.models import zoo

    cfg = dataclasses.replace(cfg) if cfg is not None else DemoConfig()
    cfg.dtype = cfg.dtype or harness.default_dtype()
    out = Path(cfg.out_dir)
    t_start = time.perf_counter()
    print(
        f"== ivl demo: train a value network on {cfg.train_base}, transfer it to "
        f"{cfg.transfer_base} ==",
        flush=True,
    )

    t0 = _step(1, "fetching the models (cached after the first run)")
    for name in dict.fromkeys((cfg.train_base, cfg.transfer_base, cfg.value_init)):
        if name in zoo.MODELS:
            print(f"  {name}: {zoo.fetch(name, progress=cfg.progress)}", flush=True)
    print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)

    t0 = _step(
        2,
        f"training the value network (init {cfg.value_init}, "
        f"{cfg.batch_size * cfg.grad_accum} demonstrations per step, "
        + (f"{cfg.train_steps} steps)" if cfg.train_steps else f"~{cfg.train_minutes:g} minutes)"),
    )
    value_dir = out / "value"
    steps = _train(cfg, value_dir)
    print(f"  {steps} steps, value network in {value_dir} ({time.perf_counter() - t0:.0f}s)")

    problems = harness.gsm_problems(max(cfg.n_accuracy, cfg.n_nll), seed=cfg.seed)
    t0 = _step(3, f"evaluating the training base {cfg.train_base} alone and + value")
    spec = harness.ModelSpec("train", cfg.train_base, str(value_dir), dtype=cfg.dtype)
    rows, _ = _evaluate(spec, problems, cfg, "training base")
    print(_table(rows), f"\n  ({time.perf_counter() - t0:.0f}s)", flush=True)

    same = _same_tokenizer(cfg.train_base, cfg.transfer_base)
    how = "same tokenizer" if same else f"vocabulary map {cfg.vocab_map!r}"
    t0 = _step(4, f"plugging the same value network into {cfg.transfer_base} ({how})")
    spec = harness.ModelSpec(
        "transfer",
        cfg.transfer_base,
        str(value_dir),
        vocab_map=None if same else cfg.vocab_map,
        dtype=cfg.dtype,
    )
    rows_t, preds = _evaluate(spec, problems, cfg, "transfer base")
    rows += rows_t
    print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)

    _step(5, "results")
    print(_table(rows), flush=True)
    alone, steered = _pick_sample(preds[0], preds[1])
    print(f"\nHeld-out problem: {alone.prompt}\nReference answer: {alone.reference}\n")
    print(
        _side_by_side(
            alone.text,
            steered.text,
            (
                f"{cfg.transfer_base} alone ({'right' if alone.score else 'wrong'})",
                f"+ value ({'right' if steered.score else 'wrong'})",
            ),
        )
    )
    notes = (
        f"Value network trained {steps} steps (global batch "
        f"{cfg.batch_size * cfg.grad_accum}, {cfg.train_examples} GSM-Symbolic demonstrations, "
        f"seed {cfg.seed}) against {cfg.train_base}; accuracy: greedy, {cfg.max_new_tokens} new "
        f"tokens max, N={cfg.n_accuracy} held-out-template problems; NLL: N={cfg.n_nll}. "
        f"Total wall time {time.perf_counter() - t_start:.0f}s."
    )
    files = report.write_report(out, "demo", rows, title="ivl demo", notes=notes)
    print(f"\nTable, plot and data: {', '.join(str(f) for f in files)}")
    print(f"Total: {time.perf_counter() - t_start:.0f}s", flush=True)
    sample = {"prompt": alone.prompt, "reference": alone.reference, "alone": alone.text}
    sample["steered"] = steered.text
    return DemoResult(rows, value_dir, files, sample)
