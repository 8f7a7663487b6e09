"""The lm-eval adapter, offline: local task YAMLs over local JSONL files, tiny models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from ivl.models.tiny import save_tiny

MC_YAML = """task: ivl_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

GEN_YAML = """task: ivl_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""

ROLL_YAML = """task: ivl_local_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    base = save_tiny(d / "base", "llama", "gpt2", seed=1)
    value = save_tiny(d / "value", "llama", "gpt2", seed=2)
    return base, value


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    mc = [
        {"question": "2 + 2", "choices": [" 4", " 5", " 22"], "answer": 0},
        {"question": "capital of France", "choices": [" Paris", " Rome"], "answer": 0},
    ]
    gen = [{"question": "1 + 1", "target": "2"}, {"question": "3 + 3", "target": "6"}]
    roll = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Hello world."}]
    for name, rows, yaml in (
        ("mc", mc, MC_YAML),
        ("gen", gen, GEN_YAML),
        ("roll", roll, ROLL_YAML),
    ):
        data = d / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / f"{name}.yaml").write_text(yaml.format(data=data))
    return d


def _lm(folders, **kw):
    from ivl.eval.lm_harness import IVLLM

    base, value = folders
    return IVLLM(base=str(base), value=str(value), dtype="float32", **kw)


class _Req:
    def __init__(self, *args):
        self.args = args


def test_registered_in_lm_eval_registry():
    from lm_eval.api.registry import get_model

    import ivl.eval.lm_harness as h

    assert get_model("ivl") is h.IVLLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still there


def test_loglikelihood_matches_a_direct_merged_computation(folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = _lm(folders, alpha=0.5)
    base, value = folders
    b = AutoModelForCausalLM.from_pretrained(base)
    v = AutoModelForCausalLM.from_pretrained(value)
    tok = AutoTokenizer.from_pretrained(base)
    req = [_Req("The answer is", " four")]
    ((lp, greedy),) = lm.loglikelihood(req, disable_tqdm=True)
    ((lp0, _),) = _lm(folders, alpha=0.0).loglikelihood(req, disable_tqdm=True)
    ctx = tok("The answer is")["input_ids"]
    whole = tok("The answer is four")["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        z = b(ids).logits + 0.5 * v(ids).logits
        z0 = b(ids).logits
    n = len(whole) - len(ctx)
    tgt = ids[0, -n:]

    def ref(logits):
        lsm = torch.log_softmax(logits[0, -n - 1 : -1].double(), -1)
        return float(lsm.gather(1, tgt[:, None]).sum()), bool((lsm.argmax(-1) == tgt).all())

    assert math.isclose(lp, ref(z)[0], rel_tol=1e-4)
    assert greedy == ref(z)[1]
    assert math.isclose(lp0, ref(z0)[0], rel_tol=1e-4)
    assert lp != pytest.approx(lp0)  # the value changes the score


def test_rolling_equals_sum_of_token_logprobs(folders):
    from transformers import AutoModelForCausalLM

    lm = _lm(folders, alpha=0.0)
    text = "one two three four"
    (total,) = lm.loglikelihood_rolling([_Req(text)], disable_tqdm=True)
    ids = [lm.prefix_token_id, *lm.tok_encode(text)]
    b = AutoModelForCausalLM.from_pretrained(folders[0])
    with torch.no_grad():
        lsm = torch.log_softmax(b(torch.tensor([ids])).logits[0, :-1].double(), -1)
    assert math.isclose(
        total, float(lsm.gather(1, torch.tensor(ids[1:])[:, None]).sum()), rel_tol=1e-4
    )


def test_generate_until_runs_through_the_engine(folders):
    from ivl.engine import IVLEngine, SamplingParams

    lm = _lm(folders)
    reqs = [_Req("Q: 1 + 1\nA:", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False})]
    (text,) = lm.generate_until(reqs, disable_tqdm=True)
    ids = lm.tok_encode("Q: 1 + 1\nA:")
    ref = IVLEngine(lm.model).generate(
        ids, SamplingParams(temperature=0, max_new_tokens=5, stop=["\n"])
    )
    assert text == ref.text
    assert "\n" not in text


def test_bad_model_args_are_reported(folders):
    from ivl.eval.lm_harness import IVLLM

    with pytest.raises(ValueError, match="unknown ivl model_args"):
        IVLLM(base=str(folders[0]), bogus=1)
    with pytest.raises(ValueError, match="needs base="):
        IVLLM()


@pytest.mark.slow  # lm-eval indexes its whole task tree (~1 min)
def test_simple_evaluate_with_local_tasks(folders, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import ivl.eval.lm_harness  # noqa: F401  (registers "ivl")

    base, value = folders
    res = lm_eval.simple_evaluate(
        model="ivl",
        model_args=f"base={base},value={value},dtype=float32",
        tasks=["ivl_local_mc", "ivl_local_gen", "ivl_local_roll"],
        task_manager=TaskManager(include_path=str(tasks)),
    )
    r = res["results"]
    assert 0.0 <= r["ivl_local_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in r["ivl_local_gen"]
    assert r["ivl_local_roll"]["word_perplexity,none"] > 1.0


@pytest.mark.slow
def test_command_line_runs_offline(folders, tasks, tmp_path):
    base, value = folders
    cmd = [
        sys.executable,
        "-m",
        "ivl.eval.lm_harness",
        "run",
        "--model",
        "ivl",
        "--model_args",
        f"base={base},value={value},dtype=float32",
        "--tasks",
        "ivl_local_mc",
        "--include_path",
        str(tasks),
        "--output_path",
        str(tmp_path / "out"),
    ]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ivl_local_mc" in p.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


@pytest.mark.parametrize(("kind", "bos"), [("gemma3", True), ("qwen2", False)])
def test_bos_follows_the_tokenizers_default(kind, bos):
    from ivl.engine import IVLModel
    from ivl.eval.lm_harness import IVLLM
    from ivl.models.tiny import tiny_model

    m, tok = tiny_model("llama", kind, seed=0)
    lm = IVLLM(model=IVLModel.from_pretrained((m, tok)))
    assert lm.add_bos_token is bos
    assert (lm.tok_encode("hi")[0] == tok.bos_token_id) is bos
    assert (
        lm.tok_encode("hi", add_special_tokens=False)
        == tok("hi", add_special_tokens=False)["input_ids"]
    )
