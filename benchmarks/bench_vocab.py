"""Vocabulary maps and the re-tokenization bridge on real zoo models.

Rows (benchmarks/results/vocab.csv):
- ``map``: build time of an exact and a dtw map per (base, value) tokenizer pair on a fixed
  offline corpus (--corpus, default the ShareGPT chats; --corpus-chars characters, default 3 MB)
  and the stored map's bytes;
- ``generate``: greedy generation with a value model of another tokenizer: value tokens fed to
  the value model per generated base token (target <= 1.5), value tokens produced by the tail
  re-encodings per base token, ms per token of the bridged pair, of the base alone, and of the
  same pair with the bridge's Python work (``Bridge.step``) timed separately;
- ``same-vocab``: the bridge's whole cost with the same models: SmolLM2 base + SmolLM2 value
  generated normally (one vocabulary, no bridge) and with the bridge forced on (identical
  tokenizers on both sides, so the tokens must not change), ms per token of each.

Run: ``flock /tmp/ivl-heavy.lock python benchmarks/bench_vocab.py`` (a few minutes on 2 CPU
cores; loads SmolLM2-135M, Qwen2.5-Coder-0.5B and Gemma3-270M from the zoo cache).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import append_csv
from ivl.engine import IVLEngine, IVLModel, SamplingParams
from ivl.models.loading import load_model, load_tokenizer
from ivl.vocab import build_map
from ivl.vocab.corpus import corpus_texts

VALUE = "smollm2-135m-instruct"
BASES = ("qwen2.5-coder-0.5b-instruct", "gemma3-270m")
PROMPTS = [
    "Write a short Python function that returns the sum of the squares of a list of numbers.",
    "Explain in two sentences why the sky is blue.",
]


def bench_maps(corpus: str, corpus_chars: int) -> list[dict]:
    texts = corpus_texts(corpus, max_chars=corpus_chars)
    vt = load_tokenizer(VALUE)
    rows = []
    for base in BASES:
        bt = load_tokenizer(base)
        for kind in ("exact", "dtw"):
            t0 = time.perf_counter()
            vmap = build_map(bt, vt, kind=kind, corpus=texts if kind == "dtw" else None)
            secs = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as d:
                path = vmap.save(Path(d) / "m")
                stored = sum(f.stat().st_size for f in path.iterdir())
            rows.append(
                {
                    "what": "map",
                    "base": base,
                    "value": VALUE,
                    "kind": kind,
                    "corpus_chars": sum(map(len, texts)) if kind == "dtw" else 0,
                    "corpus": corpus if kind == "dtw" else "",
                    "build_s": round(secs, 2),
                    "mapped": vmap.n_mapped(),
                    "base_vocab": vmap.base_size,
                    "stored_bytes": stored,
                }
            )
            print(rows[-1])
    return rows


def bench_generate(max_new: int, dtype) -> list[dict]:
    value = (load_model(VALUE, dtype=dtype), load_tokenizer(VALUE))
    params = SamplingParams(temperature=0, max_new_tokens=max_new, ignore_eos=True, seed=0)
    rows = []
    for base_name in BASES:
        base = (load_model(base_name, dtype=dtype), load_tokenizer(base_name))
        alone = IVLEngine(IVLModel.from_pretrained(base), max_batch=2, max_len=512)
        model = IVLModel.from_pretrained(base, value, vocab_map="auto")
        bridged = IVLEngine(model, max_batch=2, max_len=512)
        step, spent = model.bridge.step, [0.0]

        def timed(st, t, _step=step, spent=spent):
            t0 = time.perf_counter()
            _step(st, t)
            spent[0] += time.perf_counter() - t0

        model.bridge.step = timed
        alone.generate_many(PROMPTS[:1], SamplingParams(max_new_tokens=4, temperature=0))
        bridged.generate_many(PROMPTS[:1], SamplingParams(max_new_tokens=4, temperature=0))
        bridged.bridge_stats = dict.fromkeys(bridged.bridge_stats, 0)
        spent[0] = 0.0
        t0 = time.perf_counter()
        res_a = alone.generate_many(PROMPTS, params)
        t_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        res_b = bridged.generate_many(PROMPTS, params)
        t_bridged = time.perf_counter() - t0
        n_a = sum(len(r.token_ids) for r in res_a)
        n_b = sum(len(r.token_ids) for r in res_b)
        st = bridged.bridge_stats
        rows.append(
            {
                "what": "generate",
                "base": base_name,
                "value": VALUE,
                "kind": model.vocab_map.kind,
                "dtype": str(dtype).replace("torch.", ""),
                "batch": len(PROMPTS),
                "base_tokens": st["steps"],
                "fed_per_token": round(st["fed"] / max(1, st["steps"]), 3),
                "encoded_per_token": round(st["encoded"] / max(1, st["steps"]), 3),
                "ms_per_token_bridged": round(1e3 * t_bridged / max(1, n_b), 2),
                "ms_per_token_base_alone": round(1e3 * t_alone / max(1, n_a), 2),
                "bridge_step_ms_per_token": round(1e3 * spent[0] / max(1, n_b), 3),
                "text": res_b[0].text[:60].replace("\n", " "),
            }
        )
        print(rows[-1])
        del base, alone, bridged, model
    return rows


def _timed_generate(engine: IVLEngine, params: SamplingParams):
    engine.generate_many(PROMPTS[:1], SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
    t0 = time.perf_counter()
    res = engine.generate_many(PROMPTS, params)
    return res, time.perf_counter() - t0


def bench_same_vocab(max_new: int, dtype) -> list[dict]:
    from ivl.engine.bridge import Bridge

    tok = load_tokenizer(VALUE)
    base, value = load_model(VALUE, dtype=dtype), load_model(VALUE, dtype=dtype)
    params = SamplingParams(temperature=0, max_new_tokens=max_new, ignore_eos=True, seed=0)
    plain = IVLEngine(IVLModel(base, tok, value), max_batch=2, max_len=512)
    forced = IVLModel(base, tok, value, bridge=Bridge(tok, tok), value_tokenizer=tok)
    bridged = IVLEngine(forced, max_batch=2, max_len=512)
    res_p, t_p = _timed_generate(plain, params)
    res_b, t_b = _timed_generate(bridged, params)
    if [r.token_ids for r in res_p] != [r.token_ids for r in res_b]:
        raise AssertionError("the forced bridge changed the tokens of a same-tokenizer pair")
    n = sum(len(r.token_ids) for r in res_p)
    st = bridged.bridge_stats
    row = {
        "what": "same-vocab",
        "base": VALUE,
        "value": VALUE,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": len(PROMPTS),
        "base_tokens": n,
        "fed_per_token": round(st["fed"] / max(1, st["steps"]), 3),
        "ms_per_token_bridged": round(1e3 * t_b / max(1, n), 2),
        "ms_per_token_same_vocab": round(1e3 * t_p / max(1, n), 2),
    }
    print(row)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="sharegpt", help="a built-in corpus or a .txt/.jsonl file")
    ap.add_argument("--corpus-chars", type=int, default=3_000_000)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--only-same-vocab", action="store_true", help="just the same-vocab rows")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)  # float32: bf16 matmuls are slow on CPUs without AVX512-BF16
    rows = [] if args.only_same_vocab else bench_maps(args.corpus, args.corpus_chars)
    if not args.skip_generate:
        rows += bench_same_vocab(args.max_new_tokens, dtype)
    if not (args.skip_generate or args.only_same_vocab):
        rows += bench_generate(args.max_new_tokens, dtype)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    print(append_csv("vocab", [{k: row.get(k, "") for k in fields} for row in rows]))


if __name__ == "__main__":
    main()
