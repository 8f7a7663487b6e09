"""ivl.eval: scoring, teacher-forced merged NLL, batched generation eval, fine-tuning, suites."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ivl.eval import metrics
from ivl.models.tiny import save_tiny, tiny_model

# ----------------------------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### $1,250.00", "1250"),
        ("first 12 then 30 so the answer is 42.", "42"),
        ("#### 3.5 and later 9", "3.5"),
        ("it is 8 #### unknown", "8"),  # nothing after ####: the last number
        ("nothing numeric", None),
        ("#### -4", "-4"),
    ],
)
def test_extract_answer(text, want):
    assert metrics.extract_answer(text) == want


def test_numeric_and_exact_match():
    assert metrics.numeric_match("so 2 + 2 = 4\n#### 4", "4") == 1.0
    assert metrics.numeric_match("#### 5", "4") == 0.0
    assert metrics.exact_match("  Paris ", "Paris") == 1.0
    with pytest.raises(ValueError, match="holds no number"):
        metrics.numeric_match("4", "four")


def test_wilson_interval_known_values():
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = metrics.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert all(math.isnan(x) for x in metrics.wilson_interval(0, 0))


def test_custom_scorer_import_needs_explicit_permission():
    with pytest.raises(ValueError, match="allow-custom-scorer"):
        metrics.resolve_scorer("os.path:join")
    assert metrics.resolve_scorer("ivl.eval.metrics:exact_match", allow_import=True)("a", "a") == 1
    with pytest.raises(ValueError, match="cannot load scorer"):
        metrics.resolve_scorer("ivl.eval.metrics:nope", allow_import=True)
    with pytest.raises(ValueError, match="unknown scorer"):
        metrics.resolve_scorer("fuzzy")


# ----------------------------------------------------------------------------------------------
# teacher-forced scoring


@pytest.fixture(scope="module")
def pair():
    from ivl.engine import IVLModel

    b, tok = tiny_model("qwen2", "smollm2", seed=1)
    v, _ = tiny_model("qwen2", "smollm2", seed=2)
    a, _ = tiny_model("qwen2", "smollm2", seed=3)
    return b, v, a, tok, IVLModel.from_pretrained((b, tok), (v, tok))


def _naive(logits, ids):
    lsm = torch.log_softmax(logits[0, :-1].double(), -1)
    return lsm.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_sequence_logprobs_match_naive_merge(pair):
    from ivl.eval.harness import sequence_logprobs

    b, v, _, tok, m = pair
    ids = tok("Natalia sold 48 clips in April and half as many in May.")["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        zb, zv = b(x).logits, v(x).logits
    got = sequence_logprobs(m, ids, (0.0, 1.0, 2.5))
    for alpha in (0.0, 1.0, 2.5):
        ref = _naive(zb + alpha * zv, ids)
        assert torch.allclose(got[alpha][0].double(), ref, atol=1e-4)
        argmax = (zb + alpha * zv)[0, :-1].argmax(-1) == torch.tensor(ids[1:])
        assert torch.equal(got[alpha][1], argmax)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sequence_logprobs(m, ids[:1])


def test_sequence_logprobs_proxy_tuning(pair):
    from ivl.engine import IVLModel
    from ivl.eval.harness import sequence_logprobs

    b, v, a, tok, _ = pair
    m = IVLModel.from_pretrained((b, tok), (v, tok), scheme="proxy", anti_expert=(a, tok))
    ids = tok("two plus two is four")["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        z = b(x).logits + 0.5 * (v(x).logits - a(x).logits)
    got = sequence_logprobs(m, ids, (0.5,))[0.5][0]
    assert torch.allclose(got.double(), _naive(z, ids), atol=1e-4)


def test_teacher_forced_logprobs_equal_the_engines_sampling_logprobs(pair):
    from ivl.engine import IVLEngine, SamplingParams
    from ivl.eval.harness import sequence_logprobs

    *_, tok, m = pair
    prompt = tok("The cat sat on the mat and said")["input_ids"]
    params = SamplingParams(temperature=0, max_new_tokens=10, logprobs=True, ignore_eos=True)
    r = IVLEngine(m).generate(prompt, params)
    lp, hit = sequence_logprobs(m, prompt + r.token_ids, (1.0,))[1.0]
    n = len(prompt) - 1
    assert torch.allclose(lp[n:], torch.tensor(r.logprobs), atol=1e-4)
    assert bool(hit[n:].all())  # greedy tokens are the argmax


def test_bridged_value_reads_each_prefix_in_its_own_tokens():
    pytest.importorskip("ivl.vocab")
    from ivl.engine import IVLModel
    from ivl.eval.harness import _bridged_value_logits, sequence_logprobs

    b, btok = tiny_model("qwen2", "qwen2", seed=1)
    v, vtok = tiny_model("llama", "smollm2", seed=2)
    m = IVLModel.from_pretrained((b, btok), (v, vtok), vocab_map="auto")
    assert m.bridge is not None
    ids = btok("Pneumonoultramicroscopic tokenization, naïvely: 12345 apples")["input_ids"]
    got = _bridged_value_logits(m, ids)
    refs = [m.bridge.reference(ids[: t + 1]) for t in range(len(ids))]
    # Some prefixes end inside a value token, so the shared full-text forward is not enough.
    assert any(r != refs[-1][: len(r)] for r in refs)
    with torch.no_grad():
        for t, ref in enumerate(refs):
            want = v(torch.tensor([ref])).logits[0, -1]
            assert torch.allclose(got[t], want, atol=1e-4), t
    part = _bridged_value_logits(m, ids, start=5)
    assert not part[:5].any() and torch.allclose(part[5:], got[5:], atol=1e-5)
    lp = sequence_logprobs(m, ids, (1.0,))[1.0][0]
    tail = sequence_logprobs(m, ids, (1.0,), start=5)[1.0][0]
    assert torch.isfinite(lp).all() and torch.allclose(tail, lp[5:], atol=1e-5)


def test_nll_counts_only_assistant_tokens(pair):
    from ivl.eval.harness import nll, sequence_logprobs
    from ivl.train.data import IGNORE_INDEX, load_examples

    *_, tok, m = pair
    recs = [{"prompt": "What is 2+2?", "response": "2+2=4\n#### 4"}]
    res = nll(m, recs, alphas=(0.0, 1.0), progress=False)
    (ex,) = load_examples(recs, tok)
    sup = [lab != IGNORE_INDEX for lab in ex.labels[1:]]
    lp = sequence_logprobs(m, ex.input_ids, (1.0,))[1.0][0]
    want = -float(lp[torch.tensor(sup)].double().mean())
    assert res[1.0].tokens == sum(sup) == ex.n_supervised
    assert res[1.0].nll == pytest.approx(want, rel=1e-5)
    assert res[1.0].perplexity == pytest.approx(math.exp(want), rel=1e-5)
    assert res[0.0].nll != pytest.approx(res[1.0].nll)


# ----------------------------------------------------------------------------------------------
# generation


def test_generate_eval_scores_engine_outputs(pair):
    from ivl.engine import IVLEngine, SamplingParams
    from ivl.eval.harness import generate_eval

    *_, m = pair
    items = [("Say hi", "x"), ("Count to three", "y"), ("Name a color", "z")]
    ref = IVLEngine(m).generate_many(
        [[{"role": "user", "content": p}] for p, _ in items],
        SamplingParams(temperature=0, max_new_tokens=5),
    )
    first = ref[0].text
    ev = generate_eval(
        m, items, scorer=lambda pred, r: float(pred == first), max_new_tokens=5, progress=False
    )
    assert [p.text for p in ev.predictions] == [r.text for r in ref]
    assert ev.n == 3 and ev.accuracy == pytest.approx(sum(r.text == first for r in ref) / 3)
    assert ev.ci_low <= ev.accuracy <= ev.ci_high
    # answers that ran into the budget are counted (the engine's finish reason, per answer)
    assert [p.finish_reason for p in ev.predictions] == [r.finish_reason for r in ref]
    assert ev.cut_off == sum(len(r.token_ids) == 5 and r.finish_reason == "length" for r in ref)
    assert ev.summary()["cut_off"] == ev.cut_off
    alone = generate_eval(m, items, alpha=0.0, max_new_tokens=5, progress=False)
    assert alone.alpha == 0.0
    with pytest.raises(ValueError, match="scores must be in"):
        generate_eval(m, items[:1], scorer=lambda p, r: 2.0, max_new_tokens=2, progress=False)


def test_gsm_problems_come_from_held_out_templates():
    pytest.importorskip("reasoning_gym")
    from ivl.eval.harness import gsm_problems
    from ivl.train.recipes import gsm_symbolic

    held = gsm_problems(6)
    train, _ = gsm_symbolic(train_examples=40, eval_examples=0)
    assert len(held) == 6 and all(r["response"].endswith(f"#### {r['answer']}") for r in held)
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    assert metrics.extract_answer(held[0]["response"]) == metrics.normalize_number(
        held[0]["answer"]
    )


def test_read_items_errors(tmp_path):
    from ivl.eval.harness import read_items

    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_items(f)
    with pytest.raises(FileNotFoundError):
        read_items(tmp_path / "missing.jsonl")
    f.write_text('{"q": "a", "a": 1}\n')
    assert read_items(f, prompt_field="q", reference_field="a") == [("a", "1")]


# ----------------------------------------------------------------------------------------------
# fine-tuning baseline


def test_choose_method():
    from ivl.eval.finetune import choose_method

    assert choose_method(10**6, ram_bytes=1 << 30) == "full"
    assert choose_method(10**9, ram_bytes=16 << 30) == "lora"
    assert choose_method(10**9, "full", ram_bytes=1) == "full"
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        choose_method(1, "qlora")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_lowers_training_loss_and_saves_a_base(tmp_path, method, default_modes_check):
    from ivl.engine import IVLModel
    from ivl.eval.finetune import FT_JSON, finetune
    from ivl.eval.harness import nll
    from ivl.models.loading import load_model
    from ivl.train import TrainConfig

    base = save_tiny(tmp_path / "base", "qwen2", "smollm2", seed=1)
    recs = [{"prompt": f"What is {i} + {i}?", "response": f"#### {2 * i}"} for i in range(8)]
    cfg = TrainConfig(
        out_dir=str(tmp_path / method),
        max_steps=8,
        batch_size=4,
        grad_accum=2,
        lr=5e-3,
        progress=False,
    )
    out = finetune(str(base), recs, cfg, method=method)
    meta = json.loads((out / FT_JSON).read_text())
    assert meta["method"] == method and meta["steps"] == 8 and meta["tokens_seen"] > 0
    default_modes_check(out)
    tuned = load_model(out)
    assert type(tuned).__name__ == "Qwen2ForCausalLM"  # LoRA merged: a plain model
    before = nll(IVLModel.from_pretrained(str(base)), recs, alphas=(0.0,), progress=False)
    after = nll(IVLModel.from_pretrained(str(out)), recs, alphas=(0.0,), progress=False)
    assert after[0.0].nll < before[0.0].nll - 0.5
    with pytest.raises(ValueError, match="not empty"):
        finetune(str(base), recs, cfg, method=method)


# ----------------------------------------------------------------------------------------------
# suite + report + CLI


def test_suite_trains_evaluates_and_writes_the_report(tmp_path):
    pytest.importorskip("reasoning_gym")
    from ivl.eval.harness import default_dtype
    from ivl.eval.suite import load_suite, run_suite, write_suite_report

    base = str(save_tiny(tmp_path / "b", "llama", "smollm2", seed=1))
    other = str(save_tiny(tmp_path / "o", "qwen2", "smollm2", seed=2))
    spec = {
        "name": "tiny",
        "sizes": {"train_steps": 2, "train_examples": 8, "max_new_tokens": 3},
        "train": {"batch_size": 2, "grad_accum": 1, "max_length": 400, "lr": 1e-3},
        "values": {"v": {"base": base, "value_init": "first-1-layers"}},
        "finetunes": {
            "ft": {"base": other, "method": "lora", "lr": 3e-4, "train_steps": 1, "seed": 3}
        },
        "experiments": [
            {
                "name": "e",
                "configs": [
                    {"label": "alone", "base": other},
                    {"label": "+ value", "base": other, "value": "values:v"},
                    {"label": "ft", "base": "finetunes:ft"},
                    {"label": "broken", "base": other, "value": "values:v", "scheme": "cascade"},
                ],
            },
            {"name": "e2", "configs": [{"label": "alone again", "base": other}]},
        ],
    }
    f = tmp_path / "suite.json"
    f.write_text(json.dumps(spec))
    rows = run_suite(
        str(f),
        out_dir=tmp_path / "res",
        runs_dir=tmp_path / "runs",
        accuracy_problems=2,
        nll_examples=2,
        progress=False,
    )
    assert [r["config"] for r in rows] == ["alone", "+ value", "ft", "broken", "alone again"]
    assert all(r["n_acc"] == 2 and r["n_nll"] == 2 for r in rows[:3])
    assert rows[0]["alpha"] == 0.0 and rows[1]["alpha"] == 1.0
    assert rows[1]["nll"] != pytest.approx(rows[0]["nll"])
    assert "failed" in rows[3]["note"] and "residual" in rows[3]["note"]
    # a configuration listed again is not evaluated again: same numbers, said in the note
    again = rows[4]
    assert again["experiment"] == "e2" and again["note"] == "evaluated once, as e / alone"
    assert again["nll"] == rows[0]["nll"] and again["accuracy"] == rows[0]["accuracy"]
    assert again["wall_s"] == 0.0 < rows[0]["wall_s"]
    md = (tmp_path / "res" / "tiny.md").read_text()
    assert "| e | + value |" in md and "Failed configurations" in md
    assert re.search(
        r"`values:v`: steps 2, global batch 2, examples 8, lr 0.001, seed 0, tokens seen [1-9]", md
    )
    # a fine-tune's own learning rate, seed and step count (they override the suite's) are the
    # ones trained, named in its folder and reported
    assert re.search(
        r"`finetunes:ft`: steps 1, .*lr 0.0003, seed 3, tokens seen [1-9].*method lora", md
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ft-ft-s1-n8", "value-v-s2-n8"]
    # the precision the machine's defaults resolved to is in the report
    dt = default_dtype()
    assert f"Models evaluated in {dt} (this machine's default)" in md
    assert md.count(f"frozen weights in {dt}") == 2  # the value's base and the LoRA's
    assert "- e / broken: failed" in md and "- e2 / alone again" not in md
    assert (tmp_path / "res" / "tiny.png").stat().st_size > 1000
    assert (tmp_path / "res" / "tiny.csv").read_text().count("\n") == 6
    # every evaluated configuration's answers are kept, with why each one ended
    answers = sorted((tmp_path / "res" / "tiny.answers").iterdir())
    assert [a.name for a in answers] == ["e--+_value.jsonl", "e--alone.jsonl", "e--ft.jsonl"]
    lines = [json.loads(x) for x in answers[1].read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["text"] == rows[0]["sample"]
    assert rows[0]["cut_off"] == sum(x["finish_reason"] == "length" for x in lines)
    assert all(x["finish_reason"] in ("stop", "length") for x in lines)
    # --resume: the finished configurations are taken from the record, the failed one is retried,
    # and a configuration whose sizes changed is evaluated again
    state = tmp_path / "res" / "tiny.evaluated.json"
    assert len(json.loads(state.read_text())) == 3
    kw = dict(out_dir=tmp_path / "res", runs_dir=tmp_path / "runs", progress=False, resume=True)
    resumed = run_suite(str(f), accuracy_problems=2, nll_examples=2, **kw)
    kept = "kept from an earlier run (resume)"
    assert [r["note"] for r in resumed[:3]] == [kept] * 3
    for r, r0 in zip(resumed[:3], rows[:3], strict=True):
        assert (r["nll"], r["accuracy"], r["sample"], r["wall_s"]) == (
            r0["nll"],
            r0["accuracy"],
            r0["sample"],
            r0["wall_s"],
        )
    assert "failed" in resumed[3]["note"] and resumed[4]["note"] == "evaluated once, as e / alone"
    assert kept in (tmp_path / "res" / "tiny.md").read_text()
    # a run that reaches only some configurations (here --only e2; likewise one that stops
    # early) keeps the others' records for the next resume
    run_suite(str(f), accuracy_problems=2, nll_examples=2, only=["e2"], **kw)
    assert len(json.loads(state.read_text())) == 3
    again = run_suite(str(f), accuracy_problems=2, nll_examples=2, **kw)
    assert [r["note"] for r in again[:3]] == [kept] * 3
    fewer = run_suite(str(f), accuracy_problems=2, nll_examples=1, **kw)
    assert fewer[0]["note"] == "" and fewer[0]["n_nll"] == 1 and fewer[0]["wall_s"] > 0
    state.write_text("{not json")
    with pytest.raises(ValueError, match="delete it"):
        run_suite(str(f), accuracy_problems=2, nll_examples=2, **kw)
    sizes = {**load_suite(spec)["sizes"], "accuracy_problems": 0}
    write_suite_report(load_suite(spec), rows, tmp_path / "res0", sizes, {})
    assert (
        "Sizes: accuracy not measured, 200 held-out" in (tmp_path / "res0" / "tiny.md").read_text()
    )
    with pytest.raises(ValueError, match="names no entry"):
        load_suite(
            {
                **spec,
                "experiments": [{"name": "x", "configs": [{"label": "a", "base": "values:zz"}]}],
            }
        )
    with pytest.raises(ValueError, match="values:v: train_steps must be a positive integer"):
        load_suite({**spec, "values": {"v": {"base": base, "value_init": "x", "train_steps": 0}}})
    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("nope")
    with pytest.raises(ValueError, match="no experiment"):
        run_suite(spec, only=["zzz"], out_dir=tmp_path / "res", runs_dir=tmp_path / "runs")


def test_report_plot_draws_the_metrics_a_run_measured(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from ivl.eval.report import plot

    both = [
        {"config": "a", "accuracy": 0.1, "ci_low": 0.05, "ci_high": 0.2, "nll": 1.4},
        {"config": "b", "accuracy": 0.2, "ci_low": 0.1, "ci_high": 0.3, "nll": 1.3},
    ]
    nll_only = [{"config": "a", "nll": 1.4}, {"config": "b", "nll": 1.3}]
    w_both = Image.open(plot(tmp_path / "both.png", both)).size[0]
    w_one = Image.open(plot(tmp_path / "nll.png", nll_only)).size[0]
    assert w_one < 0.6 * w_both  # one panel, not an empty accuracy panel beside it
    assert plot(tmp_path / "none.png", [{"config": "a"}]) is None
    assert not (tmp_path / "none.png").exists()


def test_builtin_suites_are_valid():
    from ivl.eval.suite import TRANSFER, TRANSFER_CPU, load_suite

    s = load_suite("transfer")
    assert [e["name"] for e in s["experiments"]] == ["same-family", "cross-family", "ablations"]
    assert s["sizes"]["accuracy_problems"] >= 200
    assert s == load_suite(TRANSFER)
    cpu = load_suite("transfer-cpu")
    assert [e["name"] for e in cpu["experiments"]] == ["cross-family", "ablations"]
    assert cpu["sizes"]["accuracy_problems"] >= 200 and cpu == load_suite(TRANSFER_CPU)
    # the ablations differ from the reference value in exactly one setting each
    ref = cpu["values"]["smol"]
    for name, v in cpu["values"].items():
        changed = {k for k in {*ref, *v} if ref.get(k) != v.get(k)}
        assert len(changed) == (0 if name == "smol" else 1), (name, changed)
    # experiment 1 at CPU size: the transfer suite's configurations, transfer-cpu's value recipe
    sf = load_suite("same-family-cpu")
    assert sf["experiments"] == s["experiments"][:1] and sf["train"] == cpu["train"]
    assert sf["values"]["qwen05"]["value_init"] == cpu["values"]["smol"]["value_init"]
    assert set(sf["finetunes"]) == set(s["finetunes"])


def test_cli_eval_jsonl_and_nll(tmp_path, capsys):
    from ivl.cli import main

    base = save_tiny(tmp_path / "b", "llama", "smollm2", seed=1)
    value = save_tiny(tmp_path / "v", "llama", "smollm2", seed=2)
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "hi", "reference": "x"}\n{"prompt": "yo", "reference": "y"}\n')
    args = ["eval", "--base", str(base), "--value", str(value), "--dtype", "float32", "-q"]
    assert (
        main(
            [
                *args,
                "--task",
                "jsonl",
                "--data",
                str(data),
                "--max-new-tokens",
                "3",
                "--json",
                "--predictions",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and out["alpha"] == 1.0 and 0 <= out["accuracy"] <= 1
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "2+2?", "response": "4"}\n')
    assert main([*args, "--task", "nll", "--data", str(demos)]) == 0
    assert "NLL" in capsys.readouterr().out
    # several alphas: one pass, one result each, alpha 0 = the base alone, 1 = the single run
    assert main([*args, "--task", "nll", "--data", str(demos), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    nll_args = [*args, "--task", "nll", "--data", str(demos), "--alpha", "0,0.5,1", "--json"]
    assert main(nll_args) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert sweep["alpha"] == [0.0, 0.5, 1.0] and sweep["tokens"] == single["tokens"]
    by_alpha = {r["alpha"]: r["nll"] for r in sweep["results"]}
    assert by_alpha[1.0] == pytest.approx(single["nll"], rel=1e-6)
    assert len(set(by_alpha.values())) == 3  # the tiny value moves the NLL
    base_only = ["eval", "--base", str(base), "--dtype", "float32", "-q", "--task", "nll"]
    assert main([*base_only, "--data", str(demos), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nll"] == pytest.approx(by_alpha[0.0], rel=1e-6)
    assert main([*args, "--alpha", "0,1", "--task", "jsonl", "--data", str(data)]) == 2
    assert "several alphas need --task nll" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--alpha", "1,x"])
    assert "comma-separated" in capsys.readouterr().err
    assert main([*args, "--task", "jsonl"]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main([*args, "--task", "jsonl", "--data", str(data), "--scorer", "os:getcwd"]) == 2
    assert "allow-custom-scorer" in capsys.readouterr().err


def test_cli_eval_checks_data_before_loading_models(tmp_path, capsys, monkeypatch):
    import ivl.models.loading
    from ivl.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(ivl.models.loading, "load_model", no_loading)
    base = save_tiny(tmp_path / "b", "llama", "smollm2", seed=1)
    args = ["eval", "--base", str(base), "-q"]
    assert main([*args, "--task", "nll", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{not json\n')
    assert main([*args, "--task", "jsonl", "--data", str(bad)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert main([*args, "--task", "gsm-symbolic", "--limit", "-3"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert main([*args, "--value", str(tmp_path / "nope"), "--task", "nll"]) == 2
    assert "neither a zoo model" in capsys.readouterr().err
