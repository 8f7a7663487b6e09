"""Vocabulary maps: exact / dtw / padded / auto, storage, and the ``ivl vocab`` command.

gpt2 <-> smollm2 run in the fast suite; pairs with the qwen2 / gemma3 tokenizers (extracted from
zoo GGUF files, a fetch on a fresh machine) are marked ``zoo``. Coverage per pair is printed.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import ivl
from ivl.cli import main
from ivl.models.tiny import load_real_tokenizer, tokenizer_dir
from ivl.vocab import VocabMap, build_map
from ivl.vocab.dtw import dtw_path
from ivl.vocab.report import coverage

_TOKS: dict[str, object] = {}


def tok(kind):
    if kind not in _TOKS:
        _TOKS[kind] = load_real_tokenizer(kind)
    return _TOKS[kind]


CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?\n"
    "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "The quick brown fox jumps over the lazy dog. Über naïve café, 日本語のテキスト.",
] * 3


def _show(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}")


def check_exact(capsys, base: str, value: str, known: list[str], specials: dict[str, str]):
    bt, vt = tok(base), tok(value)
    vmap = build_map(bt, vt, kind="exact")
    assert vmap.kind == "exact" and vmap.index.dtype == torch.int64
    assert vmap.index.shape == (len(bt),) and vmap.weight.dtype == torch.float32
    cov = coverage(vmap, bt, CORPUS)
    _show(
        capsys,
        f"exact map {base} -> {value}: {cov['vocab_share']:.1%} of the base vocabulary, "
        f"{cov['corpus_share']:.1%} of corpus tokens mapped",
    )
    # every mapped pair spells the same text
    mapped = torch.nonzero(vmap.index >= 0).flatten().tolist()
    for b in mapped[:: max(1, len(mapped) // 300)]:
        if b in bt.all_special_ids:
            continue
        v = int(vmap.index[b])
        assert bt.decode([b]) == vt.decode([v]), (bt.convert_ids_to_tokens(b), v)
    for word in known:
        (b,) = bt(word, add_special_tokens=False)["input_ids"]
        (v,) = vt(word, add_special_tokens=False)["input_ids"]
        assert int(vmap.index[b]) == v and float(vmap.weight[b]) == 1.0
    for bs, vs in specials.items():
        b, v = bt.convert_tokens_to_ids(bs), vt.convert_tokens_to_ids(vs)
        assert int(vmap.index[b]) == v, (bs, vs)
    assert cov["corpus_share"] > 0.5
    return vmap


def test_exact_gpt2_smollm2(capsys):
    check_exact(
        capsys,
        "gpt2",
        "smollm2",
        [" the", "Hello", "\n", " world"],
        {"<|endoftext|>": "<|endoftext|>"},
    )
    check_exact(capsys, "smollm2", "gpt2", [" the", " clips"], {"<|endoftext|>": "<|endoftext|>"})


@pytest.mark.zoo
def test_exact_zoo_pairs(capsys):
    # ChatML markers by content; Gemma's turn markers and eos by role; sentencepiece "▁" and
    # byte-level "Ġ" spellings of the same word meet
    check_exact(
        capsys,
        "qwen2",
        "smollm2",
        [" the", "Hello", "\n"],
        {"<|im_start|>": "<|im_start|>", "<|im_end|>": "<|im_end|>"},
    )
    check_exact(
        capsys,
        "gemma3",
        "smollm2",
        [" the", "Hello"],
        {"<start_of_turn>": "<|im_start|>", "<end_of_turn>": "<|im_end|>", "<eos>": "<|im_end|>"},
    )
    vmap = check_exact(capsys, "gemma3", "gpt2", [" the"], {})
    # byte fallback: Gemma's <0xC3> is GPT-2's single byte token for 0xC3 ("Ã")
    assert int(vmap.index[tok("gemma3").convert_tokens_to_ids("<0xC3>")]) == tok(
        "gpt2"
    ).convert_tokens_to_ids("Ã")
    check_exact(capsys, "smollm2", "gemma3", [" the", "Hello"], {})
    # Gemma's <bos> has no counterpart in tokenizers that never add one
    assert int(build_map(tok("gemma3"), tok("qwen2"), kind="exact").index[2]) == -1


def test_padded_and_auto_same_tokenizer():
    t = tok("gpt2")
    vmap = build_map(t, t, kind="auto", base_columns=len(t) + 47, value_columns=len(t) + 3)
    assert vmap.kind == "padded" and vmap.same_tokenizer
    assert torch.equal(vmap.index[: len(t)], torch.arange(len(t)))
    assert (vmap.index[len(t) :] == -1).all()
    assert build_map(t, t).kind == "identity"
    with pytest.raises(ValueError, match="same tokenizer"):
        build_map(t, tok("smollm2"), kind="padded")
    assert build_map(t, tok("smollm2")).kind == "exact"


def test_dtw_path_aligns_split_words():
    # "unbelievable" as un|believ|able vs unbel|ievable: monotone, covers both sides
    path = dtw_path(["un", "believ", "able"], ["unbel", "ievable"])
    assert path[0] == (0, 0) and path[-1] == (2, 1)
    assert all(b[0] >= a[0] and b[1] >= a[1] for a, b in itertools.pairwise(path))


def test_dtw_map_agrees_with_exact_on_shared_tokens(capsys):
    bt, vt = tok("smollm2"), tok("gpt2")
    dtw = build_map(bt, vt, kind="dtw", corpus=CORPUS)
    exact = build_map(bt, vt, kind="exact")
    both = (dtw.index >= 0) & (exact.index >= 0)
    agree = float((dtw.index[both] == exact.index[both]).float().mean())
    st = dtw.meta["stats"]
    _show(
        capsys,
        f"dtw map smollm2 -> gpt2: {dtw.n_mapped()} mapped, {agree:.1%} agree with exact, "
        f"{st['build_seconds']}s for {st['corpus_chars']} chars",
    )
    # column min-max normalisation favours rare value tokens on a corpus this small (the
    # authors' method); on 200k characters of gsm-symbolic text agreement is ~95%
    assert both.sum() > 50 and agree > 0.6
    mapped = dtw.index >= 0
    assert ((dtw.weight[mapped] >= 0) & (dtw.weight[mapped] <= 1)).all()
    assert (dtw.weight[~mapped] == 0).all()
    # tokens the corpus never shows stay unmapped instead of getting an arbitrary column
    (b,) = bt(" zebra", add_special_tokens=False)["input_ids"]
    assert int(dtw.index[b]) == -1
    auto = build_map(bt, vt, kind="auto", corpus=CORPUS)
    assert auto.kind == "exact+dtw" and auto.n_mapped() >= exact.n_mapped()
    with pytest.raises(ValueError, match="corpus"):
        build_map(bt, vt, kind="dtw")


def test_save_load_roundtrip_and_wrong_tokenizer(tmp_path, default_modes_check):
    bt, vt = tok("gpt2"), tok("smollm2")
    vmap = build_map(bt, vt, kind="exact")
    path = vmap.save(tmp_path / "map")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]  # no temp leftovers
    default_modes_check(path)  # not mkdtemp's 0700 nor safetensors' 0600
    meta = json.loads((path / "vocab_map.json").read_text())
    assert meta["base"]["fingerprint"] != meta["value"]["fingerprint"]
    back = VocabMap.load(path, bt, vt)
    assert torch.equal(back.index, vmap.index) and torch.equal(back.weight, vmap.weight)
    vmap.save(path)  # overwrite in place
    with pytest.raises(ValueError, match=r"another value tokenizer.*ivl vocab build"):
        VocabMap.load(path, bt, bt)
    with pytest.raises(ValueError, match="not a vocabulary map"):
        VocabMap.load(tmp_path)
    assert ivl.VocabMap is VocabMap
    # the op takes it as is
    base, value = torch.randn(2, len(bt)), torch.randn(2, len(vt))
    out = ivl.merge_logits(base, value, alpha=1.0, vocab_map=back)
    b = int(torch.nonzero(back.index >= 0)[0])
    assert torch.allclose(out[:, b], base[:, b] + value[:, int(back.index[b])])


def test_cli_build_and_check(tmp_path, capsys):
    base, value = str(tokenizer_dir("gpt2")), str(tokenizer_dir("smollm2"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    out = tmp_path / "m"
    assert main(["vocab", "build", "--base", base, "--value", value, "--out", str(out), "-q"]) == 0
    assert "exact map" in capsys.readouterr().out
    assert main(["vocab", "check", str(out), "--corpus", str(corpus), "--sample", "Hi there"]) == 0
    text = capsys.readouterr().out
    assert "of token occurrences mapped" in text and "(2 tokens): Hi |  there" in text
    assert main(["vocab", "check", str(tmp_path), "--corpus", str(corpus)]) == 2
    assert "not a vocabulary map" in capsys.readouterr().err
