"""Demonstrations -> masked token sequences for value-network training.

Input records (one per JSONL line, or items of any iterable such as a HF ``datasets.Dataset``):

- ``{"prompt": str, "response": str}`` -> a user turn and an assistant turn;
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI style);
- ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`` (ShareGPT style).

Rendering: the tokenizer's chat template when it has one; otherwise :data:`PLAIN_TEMPLATE`::

    System: {content}\\n\\n          (system turns)
    User: {content}\\n\\n            (user turns)
    Assistant: {content}{eos}\\n\\n  (assistant turns; "{content}{eos}" is supervised)

Labels: the token ids of assistant turns (with the template's end-of-turn marker, so the model
learns to stop); every other token has label ``-100``. Labels are aligned with ``input_ids``
(``labels[t]`` is the id at position ``t``); the loss shifts them (logits at ``t - 1`` predict
``labels[t]``). Assistant spans are found by rendering each conversation prefix and mapping
character spans to tokens through the fast tokenizer's offsets, so masking follows the real
tokenization of the whole text.

Length limit (``max_length``) with a ``truncation`` policy:

- ``"right"`` (default): keep the first ``max_length`` tokens;
- ``"left"``: keep the last ``max_length`` tokens (the end of long conversations);
- ``"drop"``: skip over-long examples (logged with a count);
- ``"error"``: raise on the first over-long example.

Every record is checked before any training starts: missing fields, wrong types, empty
responses, and sequences with no supervised token left after truncation raise ``ValueError``
naming the record (``line N`` of a JSONL file, or ``item N`` of an iterable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("ivl")

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("right", "left", "drop", "error")
PLAIN_TEMPLATE = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Example:
    """One tokenized demonstration. ``labels`` is aligned with ``input_ids`` (-100 = masked)."""

    input_ids: list[int]
    labels: list[int]
    where: str  # "line 3 of data.jsonl", "item 7"

    @property
    def n_supervised(self) -> int:
        # labels[0] can never be predicted (no context), so it does not count.
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------
# Records -> messages


def to_messages(record: Any, where: str) -> list[dict[str, str]]:
    """Normalise one record to a list of ``{"role", "content"}`` messages; raise on bad input."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        raw = record[key]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: {key!r} must be a non-empty list of turns")
        messages = []
        for i, turn in enumerate(raw):
            if not isinstance(turn, dict):
                raise ValueError(f"{where}: {key}[{i}] is not an object")
            if "role" in turn:
                role, content = turn.get("role"), turn.get("content")
            elif "from" in turn:
                role, content = _SHAREGPT_ROLES.get(str(turn["from"])), turn.get("value")
                if role is None:
                    raise ValueError(f"{where}: {key}[{i}] has unknown speaker {turn['from']!r}")
            else:
                raise ValueError(f"{where}: {key}[{i}] has no 'role' (or 'from') field")
            if role not in ("system", "user", "assistant"):
                raise ValueError(
                    f"{where}: {key}[{i}] has role {role!r}; use system, user or assistant"
                )
            if not isinstance(content, str):
                raise ValueError(f"{where}: {key}[{i}] has no string 'content'")
            messages.append({"role": role, "content": content})
        assistant = [m for m in messages if m["role"] == "assistant"]
        if not assistant:
            raise ValueError(f"{where}: no assistant turn, so nothing to learn from")
        if all(not m["content"].strip() for m in assistant):
            raise ValueError(f"{where}: every assistant turn is empty")
        return messages
    missing = [k for k in ("prompt", "response") if k not in record]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {', '.join(repr(k) for k in missing)}; each record needs "
            f"'prompt' and 'response', or 'messages' (found keys: {', '.join(map(repr, record))})"
        )
    prompt, response = record["prompt"], record["response"]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"{where}: 'prompt' and 'response' must be strings")
    if not response.strip():
        raise ValueError(f"{where}: empty 'response'")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# ----------------------------------------------------------------------------------------------
# Messages -> text with assistant character spans


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple]]:
    """(text, [(start, end) character spans of supervised assistant text])."""
    if not has_chat_template(tokenizer):
        eos = tokenizer.eos_token or ""
        text, spans = "", []
        for m in messages:
            text += PLAIN_TEMPLATE[m["role"]]
            if m["role"] == "assistant":
                start = len(text)
                text += m["content"] + eos
                spans.append((start, len(text)))
            else:
                text += m["content"]
            text += "\n\n"
        return text, spans

    def apply(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text = apply(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply(messages[:i], True) if i else ""
        upto = apply(messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ValueError(
                f"{where}: the tokenizer's chat template does not render conversations "
                f"prefix-consistently, so assistant turns cannot be located"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def _tokenize(tokenizer, text: str, spans: list[tuple]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and their labels (id where the token starts inside a span)."""
    # A chat template writes its own special tokens; the plain template lets the tokenizer add
    # what it adds by default (e.g. Llama's BOS).
    add_special = not has_chat_template(tokenizer)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, labels = enc["input_ids"], []
        for tid, (s, e) in zip(ids, enc["offset_mapping"], strict=True):
            # A token belongs to a span if it overlaps it: byte-level BPE glues the leading
            # space of "Assistant: It" to "It", and that token must be learned.
            inside = e > s and any(s < b and e > a for a, b in spans)
            labels.append(tid if inside else IGNORE_INDEX)
        return ids, labels
    # Slow tokenizers have no offsets: tokenize piece by piece (boundaries may tokenize
    # slightly differently from the whole text).
    ids, labels, pos = [], [], 0
    if add_special and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for a, b in [*spans, (len(text), len(text))]:
        for piece, sup in ((text[pos:a], False), (text[a:b], True)):
            if piece:
                p = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += p
                labels += p if sup else [IGNORE_INDEX] * len(p)
        pos = b
    return ids, labels


def tokenize_record(
    tokenizer,
    record: Any,
    where: str,
    *,
    max_length: int | None = None,
    truncation: str = "right",
) -> Example | None:
    """One record -> :class:`Example` (``None`` if dropped by ``truncation="drop"``)."""
    messages = to_messages(record, where)
    text, spans = render(tokenizer, messages, where)
    ids, labels = _tokenize(tokenizer, text, spans)
    if max_length is not None and len(ids) > max_length:
        if truncation == "error":
            raise ValueError(
                f"{where}: {len(ids)} tokens > max_length={max_length} (truncation='error'); "
                f"raise max_length or choose truncation='right', 'left' or 'drop'"
            )
        if truncation == "drop":
            return None
        sl = slice(0, max_length) if truncation == "right" else slice(len(ids) - max_length, None)
        ids, labels = ids[sl], labels[sl]
    ex = Example(ids, labels, where)
    if ex.n_supervised == 0:
        why = " after truncation" if max_length is not None else ""
        raise ValueError(
            f"{where}: no supervised (assistant) token left{why} ({len(ids)} tokens); "
            f"raise max_length, use truncation='left' or 'drop', or fix the record"
        )
    return ex


# ----------------------------------------------------------------------------------------------
# Sources


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """(where, record) for each non-blank line; invalid JSON raises with the line number."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {n} of {path}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None


def _records(source: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        yield from read_jsonl(path)
        return
    for i, rec in enumerate(source):
        yield f"item {i}", rec


def load_examples(
    source: str | os.PathLike[str] | Iterable[Any],
    tokenizer,
    *,
    max_length: int | None = 2048,
    truncation: str = "right",
) -> list[Example]:
    """Tokenize and validate every record of ``source`` (a JSONL path or an iterable of dicts).

    Examples
    --------
    >>> recs = [{"prompt": "2+2?", "response": "4"}]
    >>> exs = load_examples(recs, tok)  # doctest: +SKIP
    >>> exs[0].n_supervised  # doctest: +SKIP
    2
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(
            f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATION_POLICIES)}"
        )
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out, dropped = [], 0
    for where, rec in _records(source):
        ex = tokenize_record(tokenizer, rec, where, max_length=max_length, truncation=truncation)
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    if dropped:
        logger.info("dropped %d example(s) longer than max_length=%s", dropped, max_length)
    if not out:
        raise ValueError("no training examples (the data source is empty or everything dropped)")
    return out


def fingerprint(examples: Sequence[Example]) -> str:
    """sha256 over the token ids and labels: identifies the exact training data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return h.hexdigest()


def collate(examples: Sequence[Example], pad_id: int):
    """Right-pad to the longest: ``(input_ids, attention_mask, labels)`` int64 ``[B, L]``."""
    import torch

    n = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, ex in enumerate(examples):
        k = len(ex.input_ids)
        ids[i, :k] = torch.tensor(ex.input_ids)
        labels[i, :k] = torch.tensor(ex.labels)
        mask[i, :k] = 1
    return ids, mask, labels


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
