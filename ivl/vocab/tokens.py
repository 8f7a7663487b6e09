"""Token strings as raw bytes, and special tokens matched by role.

Tokenizers spell the same text differently: byte-level BPE (GPT-2, SmolLM2, Qwen2) stores bytes
as printable stand-ins ("Ġ" = space, "Ċ" = newline), SentencePiece-style BPE (Gemma, Llama-2)
writes a space as "▁" and unknown bytes as ``<0x0A>``. :func:`token_bytes` undoes both, so two
tokens are "the same" when they stand for the same bytes.

Special tokens carry no text; they are matched by role (bos, eos, pad, unk, chat-turn markers)
or, for added tokens, by identical content (e.g. ChatML's ``<|im_start|>`` in Qwen2 and SmolLM2).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from ivl.models.tiny import _byte_unicode_alphabet

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# Chat-turn markers of common templates, by role (value spellings are matched in this order).
CHAT_ROLES = {
    "turn_start": ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "<|user|>"),
    "turn_end": ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"),
}


def tokenizer_kind(tokenizer) -> str:
    """``byte_level``, ``sentencepiece`` or ``plain`` (how token strings spell bytes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; ivl vocabulary maps need a fast "
            "(tokenizers-backed) tokenizer: load it with use_fast=True"
        )
    decoder = backend.decoder  # its JSON only, not the whole tokenizer's (vocabulary included)
    blob = json.dumps(json.loads(decoder.__getstate__())) if decoder is not None else "{}"
    if '"ByteLevel"' in blob:
        return "byte_level"
    if "\u2581" in blob or "ByteFallback" in blob or '"Metaspace"' in blob:
        return "sentencepiece"
    return "plain"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {ch: b for b, ch in enumerate(_byte_unicode_alphabet())}


def token_bytes(token: str, kind: str) -> bytes | None:
    """The bytes a token string stands for (None when it does not spell bytes)."""
    if kind == "byte_level":
        table = _byte_decoder()
        try:
            return bytes(table[ch] for ch in token)
        except KeyError:
            return None
    if kind == "sentencepiece":
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")
    return token.encode("utf-8")


def special_ids(tokenizer) -> set[int]:
    """Ids of special tokens (role tokens and added tokens flagged special)."""
    ids = {int(i) for i in tokenizer.all_special_ids if i is not None}
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def default_prefix(tokenizer) -> list[int]:
    """Special ids the tokenizer puts in front of a text by default (e.g. Gemma's <bos>)."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_sp) - len(plain) + 1):
        if with_sp[i : i + len(plain)] == plain:
            return list(with_sp[:i])
    return []


def _roles(tokenizer) -> dict[str, int]:
    """role -> id for the tokenizer's role tokens and chat markers it knows."""
    out: dict[str, int] = {}
    prefix = default_prefix(tokenizer)
    # bos only counts as a role when the tokenizer really starts texts with it: SmolLM2 names
    # <|im_start|> its bos but never adds it, and mapping Gemma's <bos> onto it would be wrong.
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id in prefix:
        out["bos"] = int(tokenizer.bos_token_id)
    for role in ("eos", "pad", "unk"):
        i = getattr(tokenizer, f"{role}_token_id", None)
        if i is not None:
            out.setdefault(role, int(i))
    vocab = tokenizer.get_vocab()
    for role, spellings in CHAT_ROLES.items():
        for s in spellings:
            if s in vocab:
                out[role] = int(vocab[s])
                break
    return out


def special_pairs(base_tok, value_tok) -> dict[int, int]:
    """base special id -> value id, by identical content first, then by role."""
    base_special = special_ids(base_tok)
    value_special = special_ids(value_tok)
    value_vocab = value_tok.get_vocab()
    pairs: dict[int, int] = {}
    for b in sorted(base_special):
        s = base_tok.convert_ids_to_tokens(b)
        v = value_vocab.get(s)
        if v is not None and v in value_special:
            pairs[b] = int(v)
    base_roles, value_roles = _roles(base_tok), _roles(value_tok)
    # eos first so that a token that is both eos and pad maps to the value's eos.
    for role in ("bos", "eos", "turn_start", "turn_end", "pad", "unk"):
        b, v = base_roles.get(role), value_roles.get(role)
        if b is not None and v is not None and b not in pairs:
            pairs[b] = v
    return pairs
