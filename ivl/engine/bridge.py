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

Safe boundary: the end of a word (a non-space character followed by whitespace) that has at
least one whole word after it, which is also a token boundary of the tail's encoding, and whose
prefix encodes alone to the same ids (checked). Pre-tokenizers (GPT-2/Qwen2-style regexes) never
merge across it once a later word exists, and SentencePiece-style vocabularies (Gemma) have no
tokens spanning a word end followed by a space. So ``ids`` equals the value tokenizer's encoding
of the whole text (:meth:`Bridge.reference`) after every step; the one documented exception is a
run of more than ``max_tail`` characters without a word end (long CJK or minified text), where
a token boundary at least ``max_tail // 2`` characters back is taken so that the tail stays
bounded: there ``ids`` are still a valid tokenization of the same text (decoding gives it back)
but may differ from the one-shot encoding inside that run.

Special tokens are hard boundaries: a base special maps to the value's token with the same
content or role (``ivl.vocab.tokens.special_pairs``) or is dropped; the base tokenizer's default
prefix (e.g. Gemma's <bos>) is replaced by the value tokenizer's.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass, field

from ivl.vocab.tokens import default_prefix, special_ids, special_pairs, token_bytes, tokenizer_kind

logger = logging.getLogger("ivl")


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
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: _utf8())
    cached: int = 0  # value ids in the value KV cache
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
        st.tail = ""
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
            st.tail += delta
            self._reencode(st)

    def _reencode(self, st: BridgeState) -> None:
        tail_ids, offsets = self._encode(st.tail, offsets=True)
        st.encoded += len(tail_ids)
        st.ids[st.committed :] = tail_ids
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
            if self._encode(text[:c]) != tail_ids[:k]:
                continue
            st.committed += k
            st.tail = text[c:]
            st.fallback_cuts += fallback
            return
