"""`ivl demo`: the main job on the embedded default (offline zoo models).

For now it proves the pipeline end to end on a real model: fetch a zoo model, then generate
answers to a few chat prompts with a KV-cached loop whose every token is chosen by
``ivl.merge_sample`` (greedy and seeded sampling), streaming the text and reporting speed. Value
training and transfer to a second base join this job as those subsystems land.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
)


@dataclass
class Generation:
    prompt: str
    text: str
    tokens: int
    seconds: float
    mean_logprob: float


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    stream=None,
) -> Generation:
    """Chat-formatted, KV-cached generation with one ``ivl.merge_sample`` call per token."""
    import ivl

    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    stop = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>"])} - {None}
    out_ids: list[int] = []
    logprobs: list[float] = []
    printed = ""
    past = None
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        result = model(input_ids=ids, cache=past, use_cache=True)
        past = result.cache
        token, logprob = ivl.merge_sample(
            result.logits[:, -1], temperature=temperature, seed=seed, step=step
        )
        tok = int(token)
        if tok == ivl.INVALID_TOKEN:
            raise RuntimeError("the model produced NaN logits; try dtype=float32")
        if tok in stop:
            break
        out_ids.append(tok)
        logprobs.append(float(logprob))
        ids = token[:, None]
        if stream is not None:
            text = tokenizer.decode(out_ids, skip_special_tokens=True)
            stream.write(text[len(printed) :])
            stream.flush()
            printed = text
    seconds = time.perf_counter() - t0
    text = tokenizer.decode(out_ids, skip_special_tokens=True)
    mean_lp = sum(logprobs) / len(logprobs) if logprobs else float("nan")
    return Generation(prompt, text, len(out_ids), seconds, mean_lp)


def run(model_name: str = DEFAULT_MODEL, *, max_new_tokens: int = 64) -> list[Generation]:
    """Fetch ``model_name`` from the zoo and answer the demo prompts, streaming to stdout."""
    from ivl.models import load_model, load_tokenizer

    torch.manual_seed(0)
    print(f"== ivl demo: {model_name} (offline zoo) ==", flush=True)
    model = load_model(model_name, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(model_name)
    results = []
    for prompt in DEFAULT_PROMPTS:
        for label, temperature in (("greedy", 0.0), ("sampled T=0.7 seed=0", 0.7)):
            print(f"\n[{label}] {prompt}\n> ", end="", flush=True)
            g = generate(
                model,
                tokenizer,
                prompt,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                stream=sys.stdout,
            )
            print(
                f"\n  ({g.tokens} tokens, {g.tokens / g.seconds:.1f} tok/s, "
                f"mean logprob {g.mean_logprob:.2f})",
                flush=True,
            )
            results.append(g)
    return results
