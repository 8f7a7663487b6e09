"""The cross-vocabulary bridge: a value model reads the base's text in its own tokens.

The base generates in its vocabulary; the value model must see the same *text* tokenized its
own way (METHOD.md section 4). Re-encoding the whole text each step would throw away the value
KV cache. Instead each request keeps a :class:`BridgeState`:

- ``ids``: the value-side ids of the text so far = ``ids[:committed]`` (stable, never
  re-encoded) + the encoding of ``tail`` (the text since the last *safe boundary*);
- per new base token, its text delta is appended to ``tail``: the token's bytes (undoing the
  byte-level / SentencePiece spellings, see ivl.vocab.tokens) go through an incremental UTF-8
  decoder, which holds back the bytes of an incomplete character (at most 3: the documented
  bounded tail) and never changes text it has returned; only ``tail`` is re-encoded, and the
  engine crops the value cache to the common prefix of the old and new ids and feeds the rest.

Safe boundaries. First rule, by how the value tokenizer splits text (``_boundary_rule``):

- BPE over GPT-2-style regex pre-tokens, each encoded on its own (GPT-2, SmolLM2, Qwen2): the
  start of a pre-token whose preceding character is neither whitespace nor an apostrophe.
  Appending text never changes the pre-tokens before such a point (a contraction like ``'l`` +
  ``l`` or a whitespace run + newline can re-split the last two pre-tokens, which the character
  rule excludes; fuzzed over ~600k boundaries of random text for both regex families);
- SentencePiece-style BPE over the whole text with spaces spelled "▁" (Gemma3): before a space
  that follows a character no vocabulary token joins to a following "▁" (BPE merges only form
  vocabulary tokens, so nothing merges across it).

Before encoding, each step moves the boundary to the latest such point of the new text on which
the old tail was split the same way, so a base token that starts a new word re-encodes just
itself and one that continues a word re-encodes that word.

Second rule (every tokenizer, after encoding): the end of a word (a non-space character followed
by whitespace) that has at least one whole word after it, which is also a token boundary of the
tail's encoding, and whose prefix encodes alone to the same ids (checked). No boundary is taken
where text could still become one of the value's added tokens (matched in the raw text first).
So ``ids`` equals the value tokenizer's encoding of the whole text (:meth:`Bridge.reference`)
after every step; the one documented exception is a run of more than ``max_tail`` characters
without a boundary (long CJK or minified text), where a token boundary at least
``max_tail // 2`` characters back is taken so that the tail stays bounded: there ``ids`` are
still a valid tokenization of the same text (decoding gives it back) but may differ from the
one-shot encoding inside that run.

Special tokens are hard boundaries: a base special maps to the value's token with the same
content or role (``ivl.vocab.tokens.special_pairs``) or is dropped; the base tokenizer's default
prefix (e.g. Gemma's <bos>) is replaced by the value tokenizer's.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field

from ivl.vocab.tokens import default_prefix, special_ids, special_pairs, token_bytes, tokenizer_kind

logger = logging.getLogger("ivl")

# a character joined to a following "▁" inside one SentencePiece token (Bridge._boundary_rule)
_JOINED_TO_SPACE = re.compile("([^\u2581])(?=\u2581)")


def _utf8() -> codecs.IncrementalDecoder:
    # Holds the bytes of an incomplete character until they complete (at most 3); invalid
    # bytes become U+FFFD once they are known to be invalid. Text it has returned never changes.
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


@dataclass
class BridgeState:
    """One request's value-side view of the text (see the module docstring)."""

    ids: list[int] = field(default_factory=list)
    committed: int = 0  # ids[:committed] encode the text before the safe boundary
    tail: str = ""  # text since the safe boundary (re-encoded every step)
    offsets: list = field(default_factory=list)  # character spans of ids[committed:] in tail
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: _utf8())
    cached: int = 0  # leading ids whose keys/values the value KV cache holds (still valid)
    fallback_cuts: int = 0  # boundaries taken by the max_tail rule
    encoded: int = 0  # value tokens produced by tail re-encodings (statistics)
    fed: int = 0  # value tokens fed to the value model after the prompt (statistics)
    steps: int = 0  # base tokens consumed after the prompt

    def feed(self) -> tuple[int, list[int]]:
        """(crop length, new ids) to run through the value model: always >= 1 id."""
        keep = min(self.cached, len(self.ids) - 1)
        return keep, self.ids[keep:]


class Bridge:
    """Re-tokenizes base text for a value model with another tokenizer.

    Parameters
    ----------
    base_tok, value_tok : fast tokenizers
    max_tail : int
        Characters of tail without a word end after which a fallback boundary is taken.

    Examples
    --------
    >>> bridge = Bridge(qwen_tok, smollm_tok)  # doctest: +SKIP
    >>> state = bridge.start(prompt_ids); bridge.step(state, next_id); state.ids  # doctest: +SKIP
    """

    def __init__(self, base_tok, value_tok, *, max_tail: int = 256):
        self.base_tok, self.value_tok, self.max_tail = base_tok, value_tok, int(max_tail)
        self.base_special = special_ids(base_tok)
        self.pairs = special_pairs(base_tok, value_tok)
        self.base_prefix = default_prefix(base_tok)
        self.value_prefix = default_prefix(value_tok)
        self._bytes = self._byte_table(base_tok)
        self._check_no_dummy_prefix()
        self._rule = self._boundary_rule(value_tok)
        # proper heads of the value's added tokens -> the rest of the token (_straddles_added)
        self._added_heads: dict[str, list[str]] = {}
        for added in getattr(value_tok, "added_tokens_decoder", {}).values():
            a = str(added)
            for i in range(1, len(a)):
                self._added_heads.setdefault(a[:i], []).append(a[i:])
        self._added_longest = max(map(len, self._added_heads), default=0)
        # regex rule: added tokens are split out of the raw text before pre-tokenization
        # (longest first); the other rules never pre-tokenize
        added = sorted({str(a) for a in getattr(value_tok, "added_tokens_decoder", {}).values()})
        added.sort(key=len, reverse=True)
        regex_rule = self._rule is not None and self._rule[0] == "regex"
        self._added_re = (
            re.compile("|".join(map(re.escape, added))) if added and regex_rule else None
        )

    @staticmethod
    def _byte_table(tok) -> list[bytes]:
        """The bytes each base token stands for. The text is decoded from these bytes with an
        incremental UTF-8 decoder rather than with ``tokenizer.decode``, whose output for a
        prefix can change retroactively (byte-fallback runs are decoded as a unit, so an
        incomplete character turns already complete ones into U+FFFD)."""
        kind = tokenizer_kind(tok)
        table = [b""] * len(tok)
        for s, i in tok.get_vocab().items():
            if i < len(table):
                raw = token_bytes(s, kind)
                table[i] = raw if raw is not None else s.encode("utf-8")
        for i, added in getattr(tok, "added_tokens_decoder", {}).items():
            if i < len(table):
                table[i] = str(added).encode("utf-8")  # added tokens are literal text
        return table

    def _check_no_dummy_prefix(self) -> None:
        # Legacy SentencePiece tokenizers (Llama-2, TinyLlama) prepend a space to every text they
        # encode, so a tail encoded alone would gain a space the real text does not have.
        ids = self.value_tok("a", add_special_tokens=False)["input_ids"]
        kind = tokenizer_kind(self.value_tok)
        first = token_bytes(self.value_tok.convert_ids_to_tokens(ids[0]), kind) if ids else b"a"
        if first is not None and first.startswith(b" "):
            raise ValueError(
                f"the value tokenizer ({getattr(self.value_tok, 'name_or_path', '?')}) adds a "
                "space in front of every text (legacy SentencePiece); the re-tokenization bridge "
                "needs one that encodes text as written (e.g. load it with legacy=False, "
                "add_prefix_space=False)"
            )

    def _boundary_rule(self, tok):
        """Which first-rule boundaries hold for the value tokenizer (module docstring):
        ``("regex", pre_tokenizer)`` for BPE over GPT-2-style regex pre-tokens (ByteLevel with
        its regex, or a regex Split then ByteLevel; no normaliser or NFC only);
        ``("spaces", chars)`` for SentencePiece-style BPE over the whole text with spaces
        spelled "▁", where no token joins a non-space character to a following "▁" except after
        the characters in ``chars`` (Gemma3: one token, ">▁</"); else None (second rule only)."""
        backend = tok.backend_tokenizer
        if type(backend.model).__name__ != "BPE":  # (its state would serialise the vocabulary)
            return None
        pre, norm = backend.pre_tokenizer, backend.normalizer
        pre_state = json.loads(pre.__getstate__()) if pre is not None else {"type": "None"}
        norm_type = json.loads(norm.__getstate__()).get("type") if norm is not None else None
        parts = pre_state.get("pretokenizers", [pre_state])
        kinds = [q["type"] for q in parts]
        if norm_type in (None, "NFC") and (
            (kinds == ["ByteLevel"] and parts[0].get("use_regex", True))
            or (kinds == ["Split", "ByteLevel"] and "Regex" in parts[0]["pattern"])
        ):
            return ("regex", pre)
        splits_on_space = kinds == ["None"] or (
            kinds == ["Split"] and parts[0]["pattern"] == {"String": " "}
        )
        if norm is not None and norm.normalize_str("a b") == "a\u2581b" and splits_on_space:
            joined = {m for t in tok.get_vocab() for m in _JOINED_TO_SPACE.findall(t)}
            return ("spaces", joined)
        return None

    def _straddles_added(self, text: str, c: int) -> bool:
        """Whether an added token's content could span position ``c`` of ``text`` (now or
        once more text arrives): added tokens are matched in the raw text first."""
        rest = text[c:]
        for n in range(1, min(c, self._added_longest) + 1):
            for remainder in self._added_heads.get(text[c - n : c], ()):
                if remainder.startswith(rest) or rest.startswith(remainder):
                    return True
        return False

    def _first_rule_cuts(self, old: str, new: str):
        """First-rule boundaries ``c <= len(old)`` of ``new``, latest first, at which ``old``
        is already split the same way (so its ids before ``c`` are final)."""
        kind, arg = self._rule
        if kind == "regex":
            if unicodedata.normalize("NFC", new) != new:
                return
            spans_old, spans_new = self._pretoken_spans(old), self._pretoken_spans(new)
            for j in range(len(spans_new) - 1, 0, -1):
                c = spans_new[j][0]
                # a contraction ('l + l) or whitespace + newline can re-split the pre-token
                # before one that follows whitespace or an apostrophe
                after_ok = new[c - 1] != "'" and not new[c - 1].isspace()
                if c <= len(old) and after_ok and spans_old[:j] == spans_new[:j]:
                    yield c
        else:  # "spaces": before a space that follows a character no token joins to it
            for c in range(len(old), 0, -1):
                if new[c] == " " and not new[c - 1].isspace() and new[c - 1] not in arg:
                    yield c

    def _pretoken_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the pre-tokens of ``text`` as the value tokenizer splits it: added
        tokens first, then the regex pre-tokenizer over the text between them."""
        pre = self._rule[1]
        spans: list[tuple[int, int]] = []
        pos = 0
        matches = self._added_re.finditer(text) if self._added_re is not None else ()
        for m in [*matches, None]:
            end = len(text) if m is None else m.start()
            if end > pos:
                spans += [(pos + a, pos + b) for _, (a, b) in pre.pre_tokenize_str(text[pos:end])]
            if m is not None:
                spans.append((m.start(), m.end()))
                pos = m.end()
        return spans

    def _cut_before_step(self, st: BridgeState, delta: str) -> None:
        """First rule: commit the tail up to the latest boundary of ``tail + delta`` that
        ``tail`` agrees with, so only the text after it is re-encoded (module docstring)."""
        if self._rule is None or not st.tail:
            return
        old, new = st.tail, st.tail + delta
        for c in self._first_rule_cuts(old, new):
            if self._straddles_added(new, c):
                continue
            k = sum(1 for _, e in st.offsets if e <= c)
            st.committed += k
            st.offsets = [(a - c, e - c) for a, e in st.offsets[k:]]
            st.tail = old[c:]
            return

    # ---- text -------------------------------------------------------------------------------
    def text_of(self, run: list[int]) -> str:
        """Text of a run of (non-special) base tokens, minus an incomplete last character."""
        return _utf8().decode(b"".join(self._bytes[t] for t in run))

    def _encode(self, text: str, offsets: bool = False):
        enc = self.value_tok(text, add_special_tokens=False, return_offsets_mapping=offsets)
        return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]

    def _strip_prefix(self, base_ids: list[int]) -> list[int]:
        n = len(self.base_prefix)
        if n and base_ids[:n] == self.base_prefix:
            return base_ids[n:]
        return base_ids

    # ---- the reference: re-encode everything ------------------------------------------------
    def reference(self, base_ids: list[int]) -> list[int]:
        """Value ids of the whole text of ``base_ids``, encoded in one go (the spec).

        Text runs between base special tokens are decoded (:meth:`text_of`) and encoded whole;
        specials map by content or role.
        """
        out = list(self.value_prefix)
        run: list[int] = []

        def flush() -> None:
            text = self.text_of(run)
            if text:
                out.extend(self._encode(text))
            run.clear()

        for t in self._strip_prefix(list(base_ids)):
            if t in self.base_special:
                flush()
                if t in self.pairs:
                    out.append(self.pairs[t])
            else:
                run.append(t)
        flush()
        return out

    # ---- incremental ------------------------------------------------------------------------
    def start(self, base_ids: list[int]) -> BridgeState:
        """The state after reading a prompt (its text is encoded once, whole)."""
        st = BridgeState(ids=list(self.value_prefix), committed=len(self.value_prefix))
        run: list[int] = []
        for t in self._strip_prefix(list(base_ids)):
            if t in self.base_special:
                if run:
                    self._start_run(st, run)
                    run = []
                self._special(st, t)
            else:
                run.append(t)
        if run:
            self._start_run(st, run)
        return st

    def _start_run(self, st: BridgeState, run: list[int]) -> None:
        st.decoder = _utf8()
        st.tail += st.decoder.decode(b"".join(self._bytes[t] for t in run))
        self._reencode(st)

    def _special(self, st: BridgeState, t: int) -> None:
        """A base special token: close the text run (held bytes are dropped), map the token."""
        st.decoder = _utf8()
        st.tail, st.offsets = "", []
        if t in self.pairs:
            st.ids.append(self.pairs[t])
        st.committed = len(st.ids)

    def step(self, st: BridgeState, t: int) -> None:
        """Read one more base token; ``st.ids`` becomes the value ids of the longer text."""
        st.steps += 1
        if t in self.base_special:
            self._special(st, t)
            return
        delta = st.decoder.decode(self._bytes[t])
        if delta:
            self._cut_before_step(st, delta)
            st.tail += delta
            self._reencode(st)

    def _reencode(self, st: BridgeState) -> None:
        tail_ids, offsets = self._encode(st.tail, offsets=True)
        st.encoded += len(tail_ids)
        # the re-encoding may change ids the value cache already holds (e.g. a base token that
        # joins the previous one into one value token): the cache is valid up to the first change
        same = st.committed
        for old, new in zip(st.ids[st.committed :], tail_ids, strict=False):
            if old != new:
                break
            same += 1
        st.cached = min(st.cached, same)
        st.ids[st.committed :] = tail_ids
        st.offsets = list(offsets)
        self._advance(st, tail_ids, offsets)

    def _advance(self, st: BridgeState, tail_ids: list[int], offsets) -> None:
        """Move the safe boundary as far as the rule allows (module docstring)."""
        text = st.tail
        ends = [i for i in range(1, len(text)) if text[i].isspace() and not text[i - 1].isspace()]
        # a word end with a later word end after it (so a whole word follows it)
        cands = ends[:-1][::-1]
        fallback = False
        if not cands and len(text) > self.max_tail:
            limit = len(text) - self.max_tail // 2
            cands = sorted({e for _, e in offsets if 0 < e <= limit}, reverse=True)[:8]
            fallback = True
        for c in cands:
            k = sum(1 for _, e in offsets if e <= c)
            if k == 0 or any(s < c for s, _ in offsets[k:]):
                continue  # c falls inside a token
            if self._encode(text[:c]) != tail_ids[:k] or self._straddles_added(text, c):
                continue
            st.committed += k
            st.tail = text[c:]
            st.offsets = [(a - c, e - c) for a, e in offsets[k:]]
            st.fallback_cuts += fallback
            return
