"""Experiment suites: train what the configurations need, evaluate them all, write the report.

A suite is a dict (or a JSON file with the same structure); the built-in ``transfer`` suite is
:data:`TRANSFER` (issue 7's three experiments). Keys:

- ``data``: ``{"recipe": "gsm-symbolic", "seed": 0}``: training data AND held-out problems
  (the recipe's held-out templates: never trained on);
- ``sizes``: ``accuracy_problems``, ``nll_examples``, ``max_new_tokens``, ``train_examples``,
  ``train_steps``, ``max_batch`` (all overridable from the command line);
- ``train``: :class:`~ivl.train.TrainConfig` fields shared by every value network and every
  fine-tune (so they get the same data, order and token budget);
- ``values``: ``name -> {"base", "value_init", and TrainConfig overrides (scheme, lam, masked)}``;
- ``finetunes``: ``name -> {"base", "method": "full"|"lora"|"auto"}``; an entry of either may
  override the suite's ``train`` fields (e.g. ``lr``, or ``seed`` for a second training run) and
  set its own ``train_steps`` (it wins over the suite's and the command line's, e.g. a
  longer-trained twin of a network beside it);
- ``experiments``: ``[{"name", "configs": [{"label", "base", "value", "alpha", "scheme",
  "anti_expert", "vocab_map"}]}]``; ``"values:NAME"`` / ``"finetunes:NAME"`` refer to the
  trained folders (a value's scheme comes from its training unless the config sets one).

Trained folders live under ``runs_dir`` in folders named after their sizes, so a run with other
sizes never reuses them, and a finished one is never retrained. Each configuration is evaluated
(held-out NLL + greedy accuracy) and the report (CSV + Markdown + PNG) is rewritten after every
configuration, so an interrupted suite keeps what it finished; ``{name}.evaluated.json`` beside it
records every finished configuration under a key of everything its numbers depend on (model
folders, alpha, scheme, vocabulary map, weights dtype, sizes, problem seed), and a run with
``resume=True`` (``--resume``) takes those rows instead of evaluating them again (and keeps the
records it has not reached, so stopping again loses none). Every
configuration's answers (text, score, tokens, finish reason) go to
``{name}.answers/{experiment}--{label}.jsonl``. A configuration that fails (e.g. a vocabulary
map that is not available) is reported in the ``note`` column; the others go on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from ivl._fs import atomic_write_text
from ivl.eval import harness, report

logger = logging.getLogger("ivl")

Q05, Q15 = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"


def _smol_values(init: str, other_init: tuple[str, str]) -> dict[str, dict]:
    """Issue 7's ablation values on SmolLM2: a reference (residual, ``init``, lambda 1 averaged
    over every position) and one value per changed setting; ``other_init`` = (name, init) is the
    initialisation ablation."""
    ref = {"base": SMOL, "value_init": init}
    name, other = other_init
    return {
        "smol": ref,
        "smol-cascade": {**ref, "scheme": "cascade"},
        "smol-cascade-no-text": {**ref, "scheme": "cascade_no_text"},
        name: {**ref, "value_init": other},
        "smol-lam0": {**ref, "lam": 0.0},
        "smol-lam1-masked": {**ref, "masked": True},
    }


def _ablations(reference_label: str, init_label: str, init_value: str) -> dict:
    """The ablations experiment over :func:`_smol_values`."""
    return {
        "name": "ablations",
        "configs": [
            {"label": "SmolLM2 alone", "base": SMOL},
            {"label": reference_label, "base": SMOL, "value": "values:smol"},
            {"label": "cascade", "base": SMOL, "value": "values:smol-cascade"},
            {"label": "cascade_no_text", "base": SMOL, "value": "values:smol-cascade-no-text"},
            {"label": init_label, "base": SMOL, "value": f"values:{init_value}"},
            {"label": "lambda 0", "base": SMOL, "value": "values:smol-lam0"},
            {"label": "lambda 1 masked", "base": SMOL, "value": "values:smol-lam1-masked"},
        ],
    }


# A value trained against Qwen2.5-Coder-0.5B ("values:qwen05") on the bigger Qwen2.5-Coder-1.5B,
# against a LoRA fine-tune of the 1.5B and proxy-tuning (a fine-tuned 0.5B minus the 0.5B).
SAME_FAMILY: dict[str, Any] = {
    "name": "same-family",
    "configs": [
        {"label": "Qwen-1.5B alone", "base": Q15},
        {"label": "Qwen-1.5B + value(0.5B)", "base": Q15, "value": "values:qwen05"},
        {"label": "Qwen-1.5B LoRA fine-tuned", "base": "finetunes:qwen15-lora"},
        {
            "label": "Qwen-1.5B proxy-tuned (0.5B FT - 0.5B)",
            "base": Q15,
            "value": "finetunes:qwen05-full",
            "anti_expert": Q05,
            "scheme": "proxy",
        },
        {"label": "Qwen-0.5B alone", "base": Q05},
        {"label": "Qwen-0.5B + value", "base": Q05, "value": "values:qwen05"},
    ],
}

# The SmolLM2 value ("values:smol") on its own base and on two other families.
CROSS_FAMILY: dict[str, Any] = {
    "name": "cross-family",
    "configs": [
        {"label": "SmolLM2 alone", "base": SMOL},
        {"label": "SmolLM2 + value", "base": SMOL, "value": "values:smol"},
        {"label": "Qwen-0.5B alone", "base": Q05},
        {
            "label": "Qwen-0.5B + SmolLM2 value",
            "base": Q05,
            "value": "values:smol",
            "vocab_map": "auto",
        },
        {"label": "Gemma-270M alone", "base": GEMMA},
        {
            "label": "Gemma-270M + SmolLM2 value",
            "base": GEMMA,
            "value": "values:smol",
            "vocab_map": "auto",
        },
    ],
}

TRANSFER: dict[str, Any] = {
    "name": "transfer",
    "title": "Transferring a value network across base models (GSM-Symbolic, held-out templates)",
    "data": {"recipe": "gsm-symbolic", "seed": 0},
    "sizes": {
        "accuracy_problems": 200,
        "nll_examples": 200,
        "max_new_tokens": 256,
        "train_examples": 2000,
        "train_steps": 200,
        "max_batch": 8,
    },
    "train": {
        "batch_size": 4,
        "grad_accum": 4,
        "lr": 5e-5,
        "max_length": 512,
        "seed": 0,
        # bf16 / base_dtype default to bfloat16 only where it is fast (harness.default_dtype)
    },
    "values": {
        # A pretrained init (the base's own checkpoint): the value starts as a competent LM of
        # the same family, so few steps suffice and it reads the tokens the way the base does.
        "qwen05": {"base": Q05, "value_init": Q05},
        **_smol_values(SMOL, ("smol-random", "random")),
    },
    "finetunes": {
        "qwen15-lora": {"base": Q15, "method": "lora"},
        "qwen05-full": {"base": Q05, "method": "full"},  # the proxy-tuning expert
    },
    "experiments": [
        SAME_FAMILY,
        CROSS_FAMILY,
        _ablations("residual, pretrained, lambda 1", "random init", "smol-random"),
    ],
}

# The same questions sized for two CPU cores (what docs/RESULTS.md reports): small value networks
# on the cheapest base (SmolLM2-135M), a few minutes of training each. The reference value is a
# freshly initialised 2-layer network of SmolLM2's architecture (it starts near z_value = 0, so it
# cannot hurt the base before it has learnt, and lr 1e-3 suits it); the init ablation replaces it
# by the first 2 layers of the pretrained checkpoint (same size and cost). Same-family transfer to
# Qwen-1.5B is SAME_FAMILY_CPU's.
TRANSFER_CPU: dict[str, Any] = {
    "name": "transfer-cpu",
    "title": "Transferring a small value network (GSM-Symbolic, held-out templates, 2 CPU cores)",
    "data": {"recipe": "gsm-symbolic", "seed": 0},
    "sizes": {
        "accuracy_problems": 200,
        "nll_examples": 200,
        "max_new_tokens": 160,
        "train_examples": 2000,
        "train_steps": 60,
        "max_batch": 32,
    },
    "train": {
        "batch_size": 4,
        "grad_accum": 1,
        "lr": 1e-3,
        "warmup_ratio": 0.0,
        "max_length": 384,
        "seed": 0,
    },
    "values": _smol_values("random-2-layers", ("smol-pretrained", "first-2-layers")),
    "experiments": [
        CROSS_FAMILY,
        _ablations("residual, random init, lambda 1", "pretrained init", "smol-pretrained"),
    ],
}

# Experiment 1 (same family, bigger base) cut to what two CPU cores can run in about 90 minutes:
# on an AVX2 CPU the 1.5B runs ~35 tokens/s forward and ~14 tokens/s forward + backward in fp32,
# so every network gets 20 steps (~16k tokens), NLL is measured on 48 held-out demonstrations and
# accuracy is left out (200 problems x 4 configurations on the 1.5B would take ~10 hours of fp32
# decoding there). On a CPU with AMX (bf16 weights, batch 32) the accuracy is affordable:
# docs/results/same-family-cpu-accuracy/suite.json is this suite with 200 problems, plus alpha
# 0.5, a 100-step value and a pretrained-init value on both bases, and a second training seed
# of the pretrained-init value and of the LoRA.
# The value is TRANSFER_CPU's recipe on Qwen-0.5B. The fine-tunes' learning rates sit at the high
# end of the usual ranges (LoRA 5e-4, full 5e-5) because 20 steps leave no room for a slow one.
SAME_FAMILY_CPU: dict[str, Any] = {
    "name": "same-family-cpu",
    "title": "A Qwen-0.5B value on Qwen-1.5B vs LoRA and proxy-tuning (held-out NLL, 2 CPU cores)",
    "data": TRANSFER_CPU["data"],
    "sizes": {
        "accuracy_problems": 0,
        "nll_examples": 48,
        "max_new_tokens": 160,
        "train_examples": 2000,
        "train_steps": 20,
        "max_batch": 8,
    },
    "train": TRANSFER_CPU["train"],
    "values": {"qwen05": {"base": Q05, "value_init": "random-2-layers"}},
    "finetunes": {
        # micro-batches of 2 (same global batch of 4): 4 x 384 tokens through the fp32 1.5B
        # peak at ~24 GB with activations and logits, more than this machine has
        "qwen15-lora": {
            "base": Q15,
            "method": "lora",
            "lr": 5e-4,
            "batch_size": 2,
            "grad_accum": 2,
        },
        "qwen05-full": {"base": Q05, "method": "full", "lr": 5e-5},
    },
    "experiments": [SAME_FAMILY],
}

SUITES = {"transfer": TRANSFER, "transfer-cpu": TRANSFER_CPU, "same-family-cpu": SAME_FAMILY_CPU}
SIZE_KEYS = tuple(TRANSFER["sizes"])


def load_suite(spec: str | os.PathLike[str] | dict) -> dict:
    """A suite by built-in name, JSON path, or dict (validated)."""
    if isinstance(spec, dict):
        suite = copy.deepcopy(spec)
    elif str(spec) in SUITES:
        suite = copy.deepcopy(SUITES[str(spec)])
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"unknown suite {str(spec)!r}: not one of {', '.join(SUITES)} and not a JSON file"
            )
        try:
            suite = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    for key in ("name", "experiments"):
        if key not in suite:
            raise ValueError(f"the suite needs a {key!r} key")
    suite.setdefault("data", {"recipe": "gsm-symbolic", "seed": 0})
    suite["sizes"] = {**TRANSFER["sizes"], **suite.get("sizes", {})}
    suite.setdefault("train", {})
    suite.setdefault("values", {})
    suite.setdefault("finetunes", {})
    for kind in ("values", "finetunes"):
        for name, entry in suite[kind].items():
            steps = entry.get("train_steps")
            if "train_steps" in entry and (type(steps) is not int or steps < 1):
                raise ValueError(f"{kind}:{name}: train_steps must be a positive integer")
    for exp in suite["experiments"]:
        for c in exp.get("configs", []):
            if "label" not in c or "base" not in c:
                raise ValueError(
                    f"experiment {exp.get('name')!r}: every config needs label and base"
                )
            for ref in (c.get("base"), c.get("value")):
                _check_ref(suite, ref)
    return suite


def _check_ref(suite: dict, ref) -> None:
    if isinstance(ref, str) and ref.split(":", 1)[0] in ("values", "finetunes") and ":" in ref:
        kind, name = ref.split(":", 1)
        if name not in suite[kind]:
            raise ValueError(f"{ref!r} names no entry of the suite's {kind!r}")


def _train_config(suite: dict, sizes: dict, out: Path, **overrides):
    from ivl.train import TrainConfig

    fast_bf16 = harness.default_dtype() == "bfloat16"
    fields = {
        "bf16": fast_bf16,
        "base_dtype": harness.default_dtype(),
        **suite["train"],
        **overrides,
    }
    return TrainConfig(
        out_dir=str(out),
        max_steps=int(sizes["train_steps"]),
        extra={
            "train_examples": int(sizes["train_examples"]),
            "seed": suite["data"].get("seed", 0),
        },
        overwrite=True,
        **fields,
    )


def _needed(suite: dict, experiments: list[dict]) -> tuple[set, set]:
    values, fts = set(), set()
    for exp in experiments:
        for c in exp["configs"]:
            for ref in (c.get("base"), c.get("value")):
                if isinstance(ref, str) and ref.startswith("values:"):
                    values.add(ref.split(":", 1)[1])
                if isinstance(ref, str) and ref.startswith("finetunes:"):
                    fts.add(ref.split(":", 1)[1])
    return values, fts


def run_suite(
    spec,
    *,
    out_dir: str | os.PathLike[str] = "docs/results",
    runs_dir: str | os.PathLike[str] = "runs/suite",
    only: list[str] | None = None,
    progress: bool = True,
    resume: bool = False,
    **sizes,
) -> list[dict]:
    """Run a suite (see module docstring); ``sizes`` override the suite's ``sizes``.

    Returns the result rows; writes ``{name}.csv/.md/.png`` and ``{name}.evaluated.json`` under
    ``out_dir``. ``resume``: reuse the rows that file holds for configurations whose key matches.
    """
    from ivl.eval.finetune import FT_JSON, finetune
    from ivl.train import train_value

    suite = load_suite(spec)
    bad = set(sizes) - set(SIZE_KEYS)
    if bad:
        raise ValueError(f"unknown size(s) {sorted(bad)}; known: {', '.join(SIZE_KEYS)}")
    sz = {**suite["sizes"], **{k: v for k, v in sizes.items() if v is not None}}
    experiments = suite["experiments"]
    if only:
        names = {e["name"] for e in experiments}
        missing = set(only) - names
        if missing:
            raise ValueError(f"no experiment(s) {sorted(missing)}; the suite has {sorted(names)}")
        experiments = [e for e in experiments if e["name"] in only]
    runs = Path(runs_dir)
    need_values, need_fts = _needed(suite, experiments)
    folders: dict[str, str] = {}
    for name in sorted(need_values):
        v = dict(suite["values"][name])
        own, out = _own_sizes(v, sz, runs / f"value-{name}")
        if not (out / "ivl.json").is_file():
            logger.info("suite: training value %s -> %s", name, out)
            base, init = v.pop("base"), v.pop("value_init")
            train_value(base, init, suite["data"]["recipe"], _train_config(suite, own, out, **v))
        folders[f"values:{name}"] = str(out)
    for name in sorted(need_fts):
        f = dict(suite["finetunes"][name])
        own, out = _own_sizes(f, sz, runs / f"ft-{name}")
        if not (out / FT_JSON).is_file():
            logger.info("suite: fine-tuning %s -> %s", name, out)
            base, method = f.pop("base"), f.pop("method", "auto")
            finetune(
                base, suite["data"]["recipe"], _train_config(suite, own, out, **f), method=method
            )
        folders[f"finetunes:{name}"] = str(out)

    n_acc, n_nll = int(sz["accuracy_problems"]), int(sz["nll_examples"])
    problems = harness.gsm_problems(max(n_acc, n_nll, 1), seed=suite["data"].get("seed", 0))
    rows: list[dict] = []
    evaluated: dict[str, dict] = {}  # a configuration that recurs (e.g. a base alone) runs once
    state = Path(out_dir) / f"{suite['name']}.evaluated.json"
    earlier = _read_evaluated(state) if resume else {}
    answers = Path(out_dir) / f"{suite['name']}.answers"
    for exp in experiments:
        for c in exp["configs"]:
            args = (suite, exp["name"], c, folders, problems, sz, progress, evaluated, earlier)
            rows.append(_evaluate_config(*args, answers=answers))
            write_suite_report(suite, rows, out_dir, sz, folders)
            # the earlier records stay until this run re-reaches them: a run that stops early (or
            # runs --only some experiments) never loses finished work from the record
            atomic_write_text(state, json.dumps({**earlier, **evaluated}, indent=1) + "\n")
    return rows


def _own_sizes(entry: dict, sz: dict, prefix: Path) -> tuple[dict, Path]:
    """A network's sizes (its own ``train_steps``, popped from ``entry``, win) and its folder,
    named after them so that other sizes never reuse it."""
    own = {**sz, "train_steps": entry.pop("train_steps", sz["train_steps"])}
    return own, Path(f"{prefix}-s{own['train_steps']}-n{own['train_examples']}")


def _read_evaluated(path: Path) -> dict[str, dict]:
    """The finished configurations an earlier run recorded (none if it recorded nothing)."""
    if not path.is_file():
        logger.info("suite: nothing to resume (%s does not exist)", path)
        return {}
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to evaluate everything") from e
    if not isinstance(earlier, dict) or not all(isinstance(r, dict) for r in earlier.values()):
        raise ValueError(f"{path} is not a suite's record of evaluated configurations")
    logger.info("suite: %d finished configuration(s) recorded in %s", len(earlier), path)
    return earlier


_METRICS = (
    "n_nll",
    "nll",
    "ppl",
    "n_acc",
    "accuracy",
    "ci_low",
    "ci_high",
    "gen_tokens",
    "cut_off",
    "sample",
)


def _evaluate_config(
    suite, experiment, c, folders, problems, sz, progress, evaluated, earlier, *, answers: Path
) -> dict:
    n_acc, n_nll = int(sz["accuracy_problems"]), int(sz["nll_examples"])
    value_ref = c.get("value")
    scheme = c.get("scheme")
    if scheme is None and isinstance(value_ref, str) and value_ref.startswith("values:"):
        scheme = suite["values"][value_ref.split(":", 1)[1]].get("scheme", "residual")
    spec = harness.ModelSpec(
        c["label"],
        folders.get(c["base"], c["base"]),
        folders.get(value_ref, value_ref) if value_ref else None,
        alpha=float(c.get("alpha", 1.0)),
        scheme=scheme or "residual",
        anti_expert=c.get("anti_expert"),
        vocab_map=c.get("vocab_map"),
        dtype=c.get("dtype"),
    )
    row: dict[str, Any] = {
        "experiment": experiment,
        "config": c["label"],
        "base": c["base"],
        "value": value_ref or "",
        "scheme": spec.scheme if value_ref else "",
        "alpha": spec.effective_alpha(),
        "note": "",
    }
    # Same model, alpha, sizes and problems give the same numbers (greedy; batching never changes
    # a request's tokens), so a configuration listed under several experiments is evaluated once,
    # and a resumed run takes the numbers an earlier run recorded under the same key.
    key = repr(
        (
            dataclasses.replace(spec, label="", dtype=spec.dtype or harness.default_dtype()),
            n_acc,
            n_nll,
            sz["max_new_tokens"],
            suite["data"],
        )
    )
    if key not in evaluated and key in earlier:
        before = earlier[key]
        row.update({k: before[k] for k in (*_METRICS, "wall_s") if k in before})
        row["note"] = "kept from an earlier run (resume)"
        evaluated[key] = {**row, "note": ""}
        return row
    if key in evaluated:
        first = evaluated[key]
        row.update({k: first[k] for k in _METRICS if k in first})
        row.update(wall_s=0.0, note=f"evaluated once, as {first['experiment']} / {first['config']}")
        return row
    t0 = time.perf_counter()
    try:
        model = spec.build()
        alpha = spec.effective_alpha()
        if n_nll:
            res = harness.nll(model, problems[:n_nll], alphas=(alpha,), progress=progress)[alpha]
            row.update(n_nll=res.examples, nll=res.nll, ppl=res.perplexity)
        if n_acc:
            items = [(r["prompt"], r["answer"]) for r in problems[:n_acc]]
            ev = harness.generate_eval(
                model,
                items,
                scorer="numeric",
                alpha=alpha,
                max_new_tokens=int(sz["max_new_tokens"]),
                max_batch=int(sz["max_batch"]),
                progress=progress,
            )
            row.update(
                n_acc=ev.n,
                accuracy=ev.accuracy,
                ci_low=ev.ci_low,
                ci_high=ev.ci_high,
                gen_tokens=ev.generated_tokens,
                cut_off=ev.cut_off,
            )
            row["sample"] = ev.predictions[0].text
            slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{experiment}--{c['label']}")
            harness.write_predictions(answers / f"{slug}.jsonl", ev)
        del model
    except (ValueError, TypeError, ImportError, NotImplementedError, OSError) as e:
        row["note"] = f"failed: {' '.join(str(e).split())[:200]}"
        logger.warning("suite: %s / %s failed: %s", experiment, c["label"], e)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    if not row["note"]:
        evaluated[key] = row
    return row


def write_suite_report(suite: dict, rows: list[dict], out_dir, sz: dict, folders: dict) -> list:
    """The suite's CSV / Markdown / PNG, with the sizes, budgets and seeds in the notes."""
    from ivl.eval.finetune import FT_JSON

    accuracy = (
        f"{sz['accuracy_problems']} held-out-template problems for accuracy (greedy, "
        f"{sz['max_new_tokens']} new tokens max, 95% Wilson CI)"
        if sz["accuracy_problems"]
        else "accuracy not measured"
    )
    nll = (
        f"{sz['nll_examples']} held-out demonstrations for NLL (nats per assistant token)"
        if sz["nll_examples"]
        else "NLL not measured"
    )
    lines = [
        f"Sizes: {accuracy}, {nll}; training: {sz['train_steps']} "
        f"optimizer steps over {sz['train_examples']} {suite['data']['recipe']} demonstrations, "
        f"data seed {suite['data'].get('seed', 0)}; train settings {json.dumps(suite['train'])}. "
        f"Models evaluated in {harness.default_dtype()} (this machine's default) unless a "
        "configuration sets its dtype.",
        "",
        "Trained artefacts:",
        "",
    ]
    for ref, folder in sorted(folders.items()):
        meta_path = Path(folder) / ("ivl.json" if ref.startswith("values:") else FT_JSON)
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            train = meta.get("train", {})
            lines.append(
                f"- `{ref}`: steps {train.get('steps', meta.get('steps'))}, global batch "
                f"{train.get('global_batch', meta.get('global_batch'))}, examples "
                f"{meta.get('data', {}).get('examples')}, lr {train.get('lr')}, seed "
                f"{train.get('seed')}"
                + (
                    f", tokens seen {meta['tokens_seen']}, {meta['wall_s']} s"
                    if "tokens_seen" in meta
                    else ""
                )
                + (f", method {meta['method']}" if "method" in meta else "")
                + (", bf16 autocast" if train.get("bf16") else "")
                + (
                    f", frozen weights in {train['base_dtype']}"
                    if train.get("base_dtype") and meta.get("method") != "full"
                    else ""
                )
            )
    failed = [r for r in rows if r.get("note", "").startswith("failed")]
    if failed:
        lines += ["", "Failed configurations:", ""]
        lines += [f"- {r['experiment']} / {r['config']}: {r['note']}" for r in failed]
    return report.write_report(
        out_dir,
        suite["name"],
        rows,
        title=suite.get("title", suite["name"]),
        notes="\n".join(lines),
    )
