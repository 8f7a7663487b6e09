"""``IVLModel``: a frozen base LM plus a value network (or nothing, or a proxy-tuning pair).

Holds the models, the base tokenizer and everything the merge needs (vocab map, fill,
vocab_limit). Checks compatibility once, at construction, with errors that say how to fix it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ivl.engine.concurrent import route_linears

logger = logging.getLogger("ivl")

SCHEMES = ("residual", "cascade", "cascade_no_text", "proxy")


def _output_vocab(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _load(spec: Any, *, dtype, device, what: str, tokenizer=None):
    """(model, tokenizer or None, folder or None) from a name/folder, a model, or a pair."""
    from ivl.models.loading import load_model, load_tokenizer

    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        spec, tokenizer = spec
    if isinstance(spec, (str, os.PathLike)):
        model = load_model(spec, dtype=dtype, device=device)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(spec)
            except (OSError, ValueError) as e:  # a value folder may ship without a tokenizer
                logger.info("no tokenizer for the %s model %s (%s)", what, spec, e)
        folder = None
        if not (isinstance(spec, str) and _is_zoo(spec)):
            folder = Path(spec)
        return model, tokenizer, folder
    if isinstance(spec, torch.nn.Module):
        model = spec
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        model.eval()
        folder = getattr(model.config, "_name_or_path", None)
        folder = Path(folder) if folder and Path(folder).is_dir() else None
        return model, tokenizer, folder
    raise TypeError(
        f"the {what} model must be a zoo name, a folder, a loaded model or a (model, tokenizer) "
        f"pair, got {type(spec).__name__}"
    )


def _check_before_loading(base, value, anti_expert, scheme: str, vocab_map) -> None:
    """Every argument that can be checked without weights, before any are loaded: a typo in
    the value's path or a wrong scheme should not cost the base's loading time first."""
    from ivl.models.loading import _check_causal_lm, _resolve

    if value is None and (scheme == "proxy" or anti_expert is not None):
        raise ValueError("proxy-tuning needs value= (the expert) and anti_expert=")
    if scheme == "proxy" and anti_expert is None:
        raise ValueError("scheme='proxy' needs anti_expert= (the untuned small model)")
    if scheme != "proxy" and anti_expert is not None:
        raise ValueError("anti_expert= is only used with scheme='proxy'")
    for what, spec in (("base", base), ("value", value), ("anti-expert", anti_expert)):
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            spec = spec[0]
        if isinstance(spec, (str, os.PathLike)):
            path, entry = _resolve(spec)  # raises on an unknown name or a missing folder
            if entry is None:
                _check_causal_lm(path, trust_remote_code=False)
                if what == "value":
                    _check_trained_scheme(path, scheme)
    if isinstance(vocab_map, (str, os.PathLike)) and vocab_map != "auto":
        from ivl.vocab.map import META_FILE

        if not (Path(vocab_map) / META_FILE).is_file():
            raise ValueError(
                f"vocab_map {str(vocab_map)!r} is not the folder of a saved map (no {META_FILE}): "
                "build one with `ivl vocab build`, or pass 'auto'"
            )


def _check_trained_scheme(value_dir: Path | None, scheme: str) -> None:
    trained = read_ivl_meta(value_dir).get("scheme")
    if trained and scheme != "proxy" and trained != scheme:
        raise ValueError(
            f"the value model was trained with scheme {trained!r} (its ivl.json) but "
            f"scheme={scheme!r} was requested; pass scheme={trained!r}"
        )


def _is_zoo(name: str) -> bool:
    from ivl.models import zoo

    return name in zoo.MODELS


def _same_tokenizer(a, b) -> bool:
    if a is b:
        return True
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def read_ivl_meta(folder: Path | None) -> dict:
    """The value checkpoint's ivl.json metadata ({} when absent)."""
    if folder is None or not (folder / "ivl.json").is_file():
        return {}
    with open(folder / "ivl.json", encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{folder / 'ivl.json'} is not valid JSON: {e}") from None


class IVLModel:
    """A base LM steered by a value network: z = z_base + alpha * z_value.

    Build it with :meth:`from_pretrained`. Attributes: ``base``, ``value`` (or None),
    ``tokenizer`` (the base's; generation happens in the base vocabulary), ``scheme``,
    ``vocab_map`` (None, (index, weight) or an ``ivl.VocabMap``), ``fill``, ``vocab_limit``,
    ``bridge`` (an :class:`ivl.engine.bridge.Bridge` when the value model reads another
    tokenization, else None), ``value_tokenizer``, and for proxy-tuning ``expert`` /
    ``anti_expert``. The models' ``nn.Linear`` layers are routed
    (:func:`ivl.engine.concurrent.route_linears`): plain ``F.linear`` except inside ivl's own
    forwards, where CPU decode steps use its narrow kernel.
    """

    def __init__(
        self,
        base,
        tokenizer,
        value=None,
        *,
        scheme: str = "residual",
        vocab_map=None,
        fill: float = 0.0,
        vocab_limit: int | None = None,
        anti_expert=None,
        bridge=None,
        value_tokenizer=None,
    ):
        self.base, self.tokenizer, self.value = base, tokenizer, value
        self.bridge, self.value_tokenizer = bridge, value_tokenizer
        self.scheme, self.vocab_map, self.fill = scheme, vocab_map, float(fill)
        self.anti_expert = anti_expert
        self.vocab_size = _output_vocab(base)
        self.vocab_limit = vocab_limit or min(self.vocab_size, len(tokenizer))
        for m in (base, value, anti_expert):
            if m is not None:
                m.eval()
                m.requires_grad_(False)
                # decode-step linears may take ivl's narrow CPU kernel inside narrow_linears()
                # (the engine's, IVLForCausalLM's and IVLLogitsProcessor's forwards)
                route_linears(m)

    def require_shared_tokenizer(self, what: str) -> None:
        """Raise if the value model reads another tokenization: only IVLEngine bridges it."""
        if self.bridge is not None:
            raise ValueError(
                f"{what} feeds base token ids to the value model, but the value model uses "
                "another tokenizer (a vocabulary-map pair); use ivl.IVLEngine, which re-tokenizes "
                "for the value model"
            )

    @property
    def expert(self):
        return self.value if self.scheme == "proxy" else None

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        base,
        value=None,
        *,
        dtype=None,
        scheme: str = "residual",
        vocab_map=None,
        fill: float = 0.0,
        device=None,
        tokenizer=None,
        anti_expert=None,
    ) -> IVLModel:
        """Load (or wrap) a base and a value model.

        Parameters
        ----------
        base, value : str, path, model, or (model, tokenizer)
            Zoo names or Hugging Face folders are loaded with ``ivl.models.load_model``; a loaded
            model needs its tokenizer (``tokenizer=`` for the base, or a pair). ``value=None``
            generates with the base alone.
        dtype : torch.dtype, optional
            Weights dtype for both models (default: as stored).
        scheme : str
            ``residual`` (value reads token ids; the default), ``cascade`` /
            ``cascade_no_text`` (value reads softmax(z_base) @ E_value, plus its own token
            embeddings for ``cascade``), or ``proxy`` (proxy-tuning: ``value`` is the expert
            and ``anti_expert`` is required; z = z_base + alpha * (z_expert - z_anti)).
            Checked against the value checkpoint's ivl.json when it has one.
        vocab_map : ivl.VocabMap, str, path or (index, weight), optional
            Maps value columns into the base vocabulary when the vocabularies differ: a
            ``VocabMap``, the folder of one saved by ``ivl vocab build``, or ``"auto"`` (built
            now: exact string matches, see docs/vocab.md). When the value's tokenizer differs
            from the base's, the engine also re-tokenizes the text for the value model (the
            bridge, ivl.engine.bridge); a map is then required.
        fill : float
            Value logit assumed for unmapped base tokens.

        Examples
        --------
        >>> m = IVLModel.from_pretrained("smollm2-135m", "smollm2-135m-instruct")  # doctest: +SKIP
        """
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        _check_before_loading(base, value, anti_expert, scheme, vocab_map)
        base_m, base_tok, _ = _load(
            base, dtype=dtype, device=device, what="base", tokenizer=tokenizer
        )
        if base_tok is None:
            raise ValueError(
                "the base model needs a tokenizer: pass tokenizer= or a (model, tokenizer) pair"
            )
        device = device or next(base_m.parameters()).device
        if value is None:
            return cls(base_m, base_tok, None, scheme=scheme)
        value_m, value_tok, value_dir = _load(value, dtype=dtype, device=device, what="value")
        _check_trained_scheme(value_dir, scheme)
        if next(value_m.parameters()).device != next(base_m.parameters()).device:
            value_m = value_m.to(next(base_m.parameters()).device)
        anti_m = None
        if scheme == "proxy":
            anti_m, anti_tok, _ = _load(anti_expert, dtype=dtype, device=device, what="anti-expert")
            anti_m = anti_m.to(next(base_m.parameters()).device)
            if anti_tok is not None and not _same_tokenizer(base_tok, anti_tok):
                raise ValueError("the anti-expert must share the base's tokenizer")
            if _output_vocab(anti_m) != _output_vocab(value_m):
                raise ValueError(
                    f"expert and anti-expert vocabularies differ ({_output_vocab(value_m)} vs "
                    f"{_output_vocab(anti_m)}); proxy-tuning needs the same vocabulary"
                )

        vb, vv = _output_vocab(base_m), _output_vocab(value_m)
        bridge = None
        if value_tok is not None and not _same_tokenizer(base_tok, value_tok):
            if vocab_map is None:
                raise ValueError(
                    f"the value model's tokenizer differs from the base's (vocabularies {vv} vs "
                    f"{vb}): build a map with `ivl vocab build` and pass vocab_map= (a saved "
                    "map's folder, an ivl.VocabMap, or 'auto' for exact string matches)"
                )
            if scheme != "residual":
                raise ValueError(
                    f"scheme={scheme!r} needs the value to share the base's tokenizer; a value "
                    "model with another tokenizer works with scheme='residual' only"
                )
            from ivl.engine.bridge import Bridge

            bridge = Bridge(base_tok, value_tok)
        if vocab_map is not None and not (isinstance(vocab_map, (tuple, list)) and bridge is None):
            from ivl.vocab.map import resolve

            vocab_map = resolve(
                vocab_map,
                base_tok,
                value_tok if value_tok is not None else base_tok,
                base_columns=vb,
                value_columns=vv,
            ).to(device)
        vocab_limit = min(vb, len(base_tok))
        if vocab_map is None and vv != vb:
            if len(base_tok) <= min(vv, vb):
                # Same tokenizer (or none shipped with the value: assumed the same), different
                # padding of the embedding matrix (e.g. Qwen2 151,936 vs 152,064): identity map;
                # ids past the tokenizer are never sampled.
                index = torch.arange(vb, dtype=torch.int64)
                index[vv:] = -1
                vocab_map = (index.to(device), torch.ones(vb, device=device))
                logger.info("value vocabulary padded differently (%d vs %d): identity map", vv, vb)
            else:
                raise ValueError(
                    f"vocabularies differ ({vv} value vs {vb} base columns): build a map with "
                    "`ivl vocab build` or pass vocab_map="
                )
        if scheme in ("cascade", "cascade_no_text") and vocab_map is not None:
            raise ValueError(f"scheme={scheme!r} needs the value to share the base's vocabulary")
        return cls(
            base_m,
            base_tok,
            value_m,
            scheme=scheme,
            vocab_map=vocab_map,
            fill=fill,
            vocab_limit=vocab_limit,
            anti_expert=anti_m,
            bridge=bridge,
            value_tokenizer=value_tok,
        )

    # ---- helpers shared by the engine, the naive loop and the HF adapters ------------------
    def eos_ids(self) -> set[int]:
        """End-of-sequence ids of the tokenizer and the base's generation config."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.base, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
        return ids

    def encode(self, prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt: a string, a list of ids, or chat messages."""
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = [int(t) for t in prompt]
        elif chat or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict)):
            messages = (
                prompt if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
            )
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("the base tokenizer has no chat template; drop --chat / chat=")
            out = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, return_dict=True
            )
            ids = list(out["input_ids"])
        elif isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            raise TypeError(
                f"a prompt must be a string, a list of token ids or chat messages, got {prompt!r:.60}"
            )
        if not ids:
            raise ValueError("empty prompt: give at least one token of text")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def value_inputs_embeds(self, ids: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
        """Cascade schemes: value input at position t = [E_value[id_t] +] softmax(z_base_t) @ E_value.

        ids: int64 [..., L]; base_logits: [..., L, V] (the base distribution at each position,
        which describes the next token). Returns [..., L, d] in the value's dtype.
        """
        emb = self.value.get_input_embeddings()
        probs = torch.softmax(base_logits[..., : emb.weight.shape[0]].float(), dim=-1)
        mixed = (probs @ emb.weight.float()).to(emb.weight.dtype)
        if self.scheme == "cascade":
            mixed = mixed + emb(ids)
        return mixed
