"""Evaluation of an :class:`~ivl.engine.IVLModel` (base alone, base + value, proxy-tuning).

- :func:`sequence_logprobs` / :func:`nll`: teacher-forced log-probabilities under the merged
  model ``log_softmax(z_base + alpha * z_value)``, computed with ``ivl.merged_log_softmax`` (the
  same merge the engine samples from); ``alpha = 0`` is the base alone, and several alphas share
  one forward pass of each model.
- :func:`generate_eval`: batched greedy generation through :class:`~ivl.engine.IVLEngine`
  (``generate_many``) scored against references; accuracy with a 95% Wilson interval.
- :func:`gsm_problems` / :func:`gsm_accuracy`: GSM-Symbolic problems from the held-out
  TEMPLATES of the training recipe (:mod:`ivl.train.recipes`), so no test template is ever
  trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ivl.eval.metrics import Scorer, numeric_match, resolve_scorer, wilson_interval

logger = logging.getLogger("ivl")

_ROW_CHUNK = 256  # positions per merged_log_softmax call (bounds the fp32 [rows, V] buffer)


# ----------------------------------------------------------------------------------------------
# Model configurations


def default_dtype() -> str:
    """``bfloat16`` on CUDA or on a CPU with native bf16 matmuls (AVX512-BF16 / AMX), else
    ``float32``: without them bf16 linears run ~4-6x SLOWER than fp32 (measured here)."""
    if torch.cuda.is_available():
        return "bfloat16"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


@dataclass
class ModelSpec:
    """One evaluated configuration: what :meth:`IVLModel.from_pretrained` gets, plus alpha.

    ``value`` is None for the base alone; ``scheme="proxy"`` with ``anti_expert`` is
    proxy-tuning (``value`` is then the expert). ``vocab_map`` is passed through unchanged
    (``"auto"``, a ``VocabMap``, a path, or None).
    """

    label: str
    base: Any
    value: Any = None
    alpha: float = 1.0
    scheme: str = "residual"
    anti_expert: Any = None
    vocab_map: Any = None
    dtype: str | None = None  # None: default_dtype()

    def effective_alpha(self) -> float:
        return self.alpha if self.value is not None else 0.0

    def build(self):
        from ivl.engine import IVLModel

        dtype = self.dtype or default_dtype()
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        kw: dict[str, Any] = {"dtype": dtype, "scheme": self.scheme}
        if self.value is not None:
            kw["anti_expert"] = self.anti_expert
            if self.vocab_map is not None:
                kw["vocab_map"] = self.vocab_map
        return IVLModel.from_pretrained(self.base, self.value, **kw)


# ----------------------------------------------------------------------------------------------
# Teacher-forced scoring


def _common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return k


@torch.no_grad()
def _bridged_value_logits(model, ids: list[int], start: int = 0) -> torch.Tensor:
    """[L, V_value]: at base position t >= ``start``, the value's last logits after reading the
    text of ``ids[:t+1]`` in its own tokens (``bridge.reference``: what the engine feeds it).
    Rows before ``start`` are zero.

    One KV cache walks the value encoding of the whole text in chunks; a position whose prefix
    encoding is a prefix of it (most: word ends) reads the logits of that walk, and one that
    ends inside a value token feeds its own tail on top of the common prefix and crops it off
    again. Every value token is computed once, plus the short tails.
    """
    from transformers import DynamicCache

    bridge, value, dev = model.bridge, model.value, model.device
    vocab = value.get_output_embeddings().weight.shape[0]
    out = torch.zeros(len(ids), vocab, dtype=torch.float32, device=dev)
    full = bridge.reference(ids)
    events = []  # (t, ref, k): k = common prefix of ref and full
    for t in range(start, len(ids)):
        ref = bridge.reference(ids[: t + 1])
        if ref:  # nothing to read yet: z_value = 0 (the base alone) at this position
            events.append((t, ref, _common_prefix(ref, full)))
    cache = DynamicCache(config=value.config)
    zfull = {}  # full position -> logits
    fed = 0  # the cache holds full[:fed] (plus nothing else between events)

    def feed_full(upto: int) -> None:
        nonlocal fed
        if upto <= fed:
            return
        x = torch.tensor([full[fed:upto]], device=dev)
        logits = value(input_ids=x, cache=cache, use_cache=True).logits[0]
        for i in range(fed, upto):
            zfull[i] = logits[i - fed].float()
        fed = upto

    for n, (t, ref, k) in enumerate(events):
        if k == len(ref):
            if k - 1 not in zfull:
                # feed up to the furthest full position the next matched events need
                upto = k
                for _, r2, k2 in events[n:]:
                    if k2 != len(r2):
                        break
                    upto = max(upto, k2)
                feed_full(upto)  # (logits of full positions stay valid after a crop)
            out[t] = zfull[k - 1]
            continue
        if fed > k:
            cache.crop(k - fed)  # transformers 5: a negative count of tokens to drop
            fed = k
        feed_full(k)
        tail = torch.tensor([ref[k:]], device=dev)
        out[t] = value(input_ids=tail, cache=cache, use_cache=True).logits[0, -1].float()
        cache.crop(-len(ref[k:]))
    return out


def _value_logits(model, ids: torch.Tensor, zb: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Value logits at every position of ``ids`` [1, L] (expert - anti-expert for proxy);
    with a bridge only positions >= ``start`` are computed."""
    if getattr(model, "bridge", None) is not None:  # another tokenizer: read the text its way
        return _bridged_value_logits(model, ids[0].tolist(), start)[None]
    if model.scheme in ("cascade", "cascade_no_text"):
        zv = model.value(inputs_embeds=model.value_inputs_embeds(ids, zb)).logits
    else:
        zv = model.value(input_ids=ids).logits
    if model.anti_expert is not None:
        zv = zv.float() - model.anti_expert(input_ids=ids).logits.float()
    return zv


@torch.no_grad()
def sequence_logprobs(
    model, ids: Sequence[int], alphas: Sequence[float] = (1.0,), *, start: int = 0
) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token merged log-probabilities of ``ids[start+1:]`` given their prefixes.

    Returns ``{alpha: (logprobs fp32 [L-1-start], is_argmax bool [L-1-start])}``; ``alpha = 0``
    (or no value model) never runs the value forward. ``start`` skips scoring the first tokens
    (e.g. a prompt): they are still read as context.
    """
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens to score (one of context, one to predict)")
    if not 0 <= start < len(ids) - 1:
        raise ValueError(f"start={start} must be in [0, {len(ids) - 1})")
    x = torch.tensor([list(ids)], dtype=torch.int64, device=model.device)
    zb = model.base(input_ids=x).logits[0]
    zv = None
    if model.value is not None and any(a != 0 for a in alphas):
        zv = _value_logits(model, x, zb[None], start)[0]
    import ivl

    targets = x[0, 1:]
    out = {}
    for alpha in alphas:
        lps, hits = [], []
        for s in range(start, len(ids) - 1, _ROW_CHUNK):
            e = min(s + _ROW_CHUNK, len(ids) - 1)
            use_value = zv is not None and alpha != 0
            lp = ivl.merged_log_softmax(
                zb[s:e].float(),
                zv[s:e].float() if use_value else None,
                alpha=float(alpha),
                vocab_map=model.vocab_map if use_value else None,
                fill=model.fill,
                vocab_limit=model.vocab_limit,
            )
            t = targets[s:e]
            lps.append(lp.gather(1, t[:, None])[:, 0])
            hits.append(lp.argmax(dim=1) == t)
        out[float(alpha)] = (torch.cat(lps), torch.cat(hits))
    return out


@dataclass
class NLLResult:
    """Mean negative log-likelihood (nats / supervised token) and perplexity."""

    alpha: float
    nll: float
    tokens: int
    examples: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")


def nll(
    model,
    records: Iterable[Any],
    *,
    alphas: Sequence[float] = (0.0, 1.0),
    max_length: int = 1024,
    progress: bool = True,
) -> dict[float, NLLResult]:
    """Teacher-forced NLL of the assistant tokens of held-out demonstrations.

    ``records`` are demonstration records (``{"prompt", "response"}``, ``messages`` or
    ``conversations``), rendered and masked exactly as in training (:mod:`ivl.train.data`) with
    the base's tokenizer. Returns ``{alpha: NLLResult}``.
    """
    from ivl.train.data import IGNORE_INDEX, load_examples

    examples = load_examples(list(records), model.tokenizer, max_length=max_length)
    sums = {float(a): 0.0 for a in alphas}
    count = 0
    it: Iterable = examples
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(examples, desc="nll", unit="ex", dynamic_ncols=True)
    for ex in it:
        sup = [lab != IGNORE_INDEX for lab in ex.labels[1:]]
        start = sup.index(True)  # the prompt is read, not scored
        mask = torch.tensor(sup[start:])
        scores = sequence_logprobs(model, ex.input_ids, alphas, start=start)
        for a, (lp, _) in scores.items():
            sums[a] -= float(lp.cpu()[mask].double().sum())
        count += int(mask.sum())
    return {a: NLLResult(a, s / max(count, 1), count, len(examples)) for a, s in sums.items()}


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class Prediction:
    prompt: str
    reference: str
    text: str
    score: float
    tokens: int
    error: str | None = None
    finish_reason: str | None = None  # "stop", "length" (cut off at the budget) or "error"


@dataclass
class GenEval:
    """Accuracy (mean score) of generated answers with a 95% Wilson interval."""

    alpha: float
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    generated_tokens: int
    seconds: float
    predictions: list[Prediction] = field(default_factory=list)

    @property
    def cut_off(self) -> int:
        """Answers that ran into max_new_tokens (scored as they stand)."""
        return sum(p.finish_reason == "length" for p in self.predictions)

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("predictions")
        return {**d, "cut_off": self.cut_off}


def prompt_for(model, question: str):
    """What the engine gets for a question: chat messages, or the plain training template."""
    from ivl.train.data import PLAIN_TEMPLATE, has_chat_template, render

    if has_chat_template(model.tokenizer):
        return [{"role": "user", "content": question}]
    text, _ = render(model.tokenizer, [{"role": "user", "content": question}], "prompt")
    return text + PLAIN_TEMPLATE["assistant"].rstrip()


def generate_eval(
    model,
    items: Sequence[tuple[str, str]],
    *,
    scorer: str | Scorer = "exact",
    alpha: float = 1.0,
    max_new_tokens: int = 256,
    max_batch: int = 8,
    raw_prompts: bool = False,
    progress: bool = True,
) -> GenEval:
    """Greedy answers to ``items`` = [(prompt, reference)], batched through the engine.

    Prompts are wrapped as a user turn (chat template, or the plain template of training) unless
    ``raw_prompts``. ``scorer``: ``"exact"``, ``"numeric"`` or a callable
    ``(prediction, reference) -> float in [0, 1]``.
    """
    from ivl.engine import IVLEngine, SamplingParams
    from ivl.train.data import PLAIN_TEMPLATE, has_chat_template

    if not items:
        raise ValueError("nothing to evaluate: the item list is empty")
    score_fn = resolve_scorer(scorer)
    alpha = float(alpha) if model.value is not None else 0.0
    stop: tuple[str, ...] = ()
    if raw_prompts:
        prompts = [p for p, _ in items]
    else:
        prompts = [prompt_for(model, p) for p, _ in items]
        if not has_chat_template(model.tokenizer):
            stop = ("\n\n" + PLAIN_TEMPLATE["user"].strip(),)  # the next turn of the template
    params = SamplingParams(temperature=0.0, alpha=alpha, max_new_tokens=max_new_tokens, stop=stop)
    engine = IVLEngine(model, max_batch=max_batch)
    t0 = time.perf_counter()
    results = engine.generate_many(prompts, params, chat=False, progress=progress)
    seconds = time.perf_counter() - t0
    preds = []
    for (prompt, ref), r in zip(items, results, strict=True):
        s = 0.0 if r.error else float(score_fn(r.text, ref))
        if not 0.0 <= s <= 1.0:
            raise ValueError(
                f"the scorer returned {s} for {r.text[:40]!r}; scores must be in [0, 1]"
            )
        preds.append(
            Prediction(prompt, str(ref), r.text, s, len(r.token_ids), r.error, r.finish_reason)
        )
    total = sum(p.score for p in preds)
    lo, hi = wilson_interval(total, len(preds))
    return GenEval(
        alpha,
        len(preds),
        total / len(preds),
        lo,
        hi,
        sum(p.tokens for p in preds),
        seconds,
        preds,
    )


# ----------------------------------------------------------------------------------------------
# Data


def gsm_problems(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` GSM-Symbolic records from the HELD-OUT templates of the training recipe.

    Each record has ``prompt``, ``response`` (worked solution ending in ``#### N``) and
    ``answer``. Same ``seed`` as training (default 0) gives problems of templates never trained on.
    """
    from ivl.train.recipes import gsm_symbolic

    if n < 1:
        raise ValueError(f"need n >= 1 held-out problems, got {n}")
    _, held = gsm_symbolic(train_examples=0, eval_examples=n, seed=seed)
    return held


def gsm_accuracy(model, n: int = 200, *, alpha: float = 1.0, seed: int = 0, **kw) -> GenEval:
    """Greedy accuracy on ``n`` held-out-template GSM-Symbolic problems (numeric match of the
    answer after ``####``, else the last number)."""
    items = [(r["prompt"], r["answer"]) for r in gsm_problems(n, seed=seed)]
    return generate_eval(model, items, scorer=numeric_match, alpha=alpha, **kw)


def read_items(
    path: str | os.PathLike[str],
    *,
    prompt_field: str = "prompt",
    reference_field: str = "reference",
) -> list[tuple[str, str]]:
    """(prompt, reference) pairs from a JSONL file; errors name the line."""
    from ivl.train.data import read_jsonl

    if not Path(path).is_file():
        raise FileNotFoundError(f"evaluation file {path} does not exist")
    items = []
    for where, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get(prompt_field), str):
            raise ValueError(f"{where}: needs a string field {prompt_field!r}")
        if reference_field not in rec:
            raise ValueError(f"{where}: needs a field {reference_field!r}")
        items.append((rec[prompt_field], str(rec[reference_field])))
    if not items:
        raise ValueError(f"{path} holds no records")
    return items


def write_predictions(path: Path, ev: GenEval) -> None:
    """Predictions as JSONL, written atomically."""
    from ivl._fs import atomic_write_text

    lines = [json.dumps(dataclasses.asdict(p)) for p in ev.predictions]
    atomic_write_text(path, "\n".join(lines) + "\n")
