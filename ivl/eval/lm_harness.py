"""lm-evaluation-harness adapter: ``--model ivl --model_args base=...,value=...``.

Importing this module registers the model class under the name ``ivl`` in lm-eval's model
registry. lm-eval 0.4.x does not discover models from other packages' entry points, so its own
``lm_eval`` command does not know ``ivl``; run the harness through this module instead, which
takes exactly ``lm_eval``'s arguments::

    python -m ivl.eval.lm_harness run --model ivl \\
        --model_args base=qwen2.5-coder-0.5b-instruct,value=runs/v1,alpha=1.0 \\
        --tasks my_task --include_path my_tasks/

or from Python: ``import ivl.eval.lm_harness`` then ``lm_eval.simple_evaluate(model="ivl", ...)``
(or pass an :class:`IVLLM` instance as ``model=``).

- ``loglikelihood`` / ``loglikelihood_rolling``: teacher-forced merged log-probabilities
  (:func:`ivl.eval.harness.sequence_logprobs`, the ``ivl.merged_log_softmax`` op);
- ``generate_until``: the engine (``IVLEngine.generate_many``, continuous batching), greedy
  unless the task asks for ``do_sample`` with a temperature.

Model arguments: ``base`` (required), ``value``, ``alpha`` (1.0), ``scheme`` (residual),
``anti_expert`` (proxy-tuning), ``vocab_map``, ``dtype`` (default: bfloat16 where the hardware
has fast bf16, else float32), ``max_batch`` (8), ``max_length`` (positions scored / cached per
request),
``add_bos_token`` (default: whatever the tokenizer does by default, e.g. Gemma's ``<bos>``).
"""

from __future__ import annotations

import logging
import sys

import lm_eval.models  # noqa: F401  (fills the registry first: get_model skips it when non-empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ivl.eval.harness import ModelSpec, sequence_logprobs

logger = logging.getLogger("ivl")

_IGNORED_ARGS = ("batch_size", "max_batch_size", "device", "trust_remote_code")


def _bool(x) -> bool:
    return x if isinstance(x, bool) else str(x).lower() in ("1", "true", "yes")


@register_model("ivl")
class IVLLM(TemplateLM):
    """An :class:`~ivl.engine.IVLModel` as an lm-eval ``LM`` (see module docstring)."""

    def __init__(
        self,
        base=None,
        value=None,
        alpha: float = 1.0,
        scheme: str = "residual",
        anti_expert=None,
        vocab_map=None,
        dtype: str | None = None,
        max_batch: int = 8,
        max_length: int | None = None,
        add_bos_token=None,
        model=None,
        **kwargs,
    ):
        super().__init__()
        unknown = sorted(set(kwargs) - set(_IGNORED_ARGS))
        if unknown:
            raise ValueError(
                f"unknown ivl model_args {unknown}; known: base, value, alpha, scheme, "
                "anti_expert, vocab_map, dtype, max_batch, max_length, add_bos_token"
            )
        if kwargs.get("device") not in (None, "cpu"):
            logger.info("device=%s ignored: models load where ivl puts them", kwargs["device"])
        if model is None:
            if not base:
                raise ValueError("the ivl model needs base=NAME_OR_FOLDER in --model_args")
            spec = ModelSpec(
                "lm-eval",
                base,
                value or None,
                alpha=float(alpha),
                scheme=scheme,
                anti_expert=anti_expert or None,
                vocab_map=vocab_map or None,
                dtype=dtype,
            )
            model = spec.build()
        self.model = model
        self.tokenizer = model.tokenizer
        self.alpha = float(alpha) if model.value is not None else 0.0
        self.max_batch = int(max_batch)
        limits = [getattr(model.base.config, "max_position_embeddings", None) or 2048]
        self.max_length = int(max_length or min(2048, *limits))
        self._engine = None
        if add_bos_token is None:  # what the tokenizer does by default (e.g. Gemma adds <bos>)
            plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
            add_bos_token = len(self.tokenizer("a")["input_ids"]) > len(plain)
        self.add_bos_token = _bool(add_bos_token)

    # ---- what TemplateLM needs ----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else next(iter(self.model.eos_ids())))

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "ivl").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1) :]
        n = len(continuation)
        lp, hit = sequence_logprobs(self.model, ids, (self.alpha,), start=max(0, len(ids) - 1 - n))[
            self.alpha
        ]
        return float(lp[-n:].double().sum()), bool(hit[-n:].all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for key, ctx, cont in tqdm(requests, desc="ivl loglikelihood", disable=disable_tqdm):
            if not cont:
                raise ValueError(f"empty continuation for context {key[0][-40:]!r}")
            res = self._score(list(ctx), list(cont))
            out.append(res)
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for req in tqdm(requests, desc="ivl rolling loglikelihood", disable=disable_tqdm):
            (text,) = req.args
            windows = map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            total = sum(self._score(list(c), list(t))[0] for c, t in windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ivl.engine import IVLEngine, SamplingParams

        if self._engine is None:
            self._engine = IVLEngine(self.model, max_batch=self.max_batch, max_len=self.max_length)
        prompts, params = [], []
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            do_sample = _bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            max_gen = int(kw.pop("max_gen_toks", 256))
            params.append(
                SamplingParams(
                    temperature=temperature,
                    top_p=float(kw.pop("top_p", 1.0) or 1.0),
                    top_k=int(kw.pop("top_k", 0) or 0),
                    alpha=self.alpha,
                    max_new_tokens=max_gen,
                    stop=tuple(u for u in until if u),
                )
            )
            ids = self.tok_encode(context) or [self.prefix_token_id]
            keep = max(1, self._engine.max_len - max_gen)  # left-truncate like lm-eval's HFLM
            prompts.append(ids[-keep:])
        results = self._engine.generate_many(prompts, params, progress=not disable_tqdm)
        out = []
        for req, r in zip(requests, results, strict=True):
            if r.error:
                raise ValueError(f"generation failed: {r.error}")
            out.append(r.text)
            self.cache_hook.add_partial("generate_until", req.args, r.text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``ivl`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
