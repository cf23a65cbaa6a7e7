"""Where a fused token's time goes: the bundled experts' forward passes, side by side.

    .venv/bin/python loadtest/fusion_profile.py [--reps 15]

Loads SmolLM2 and Gemma as `configs/default.yaml` does (transformers, its dtype) and times, after
a 24-token prompt, the median of `--reps`:

- `step`: one token, the last position's logits (a decode step), on 1 and on 2 threads;
- `pass_k`: k tokens in one pass, with the logits at every position (what verifying a draft
  needs) and at the last only (a catch-up), k = 2, 4, 8;
- `both_at_once`: a step of each expert at the same time, each on its own thread with one core,
  as ungated fusion asks them; against Gemma's step alone, the ceiling of fusion without drafts.

From those it works out two bounds, overheads left out:

- gated fusion: a step the primary decides alone costs at least SmolLM2's step, one it is unsure
  of at least both experts' steps at once (Gemma's view needs the piece just chosen); with a
  share `g` of steps decided alone, pieces per second against Gemma's own are at most
  step_G / (g * step_S + (1 - g) * both_at_once);
- draft and verify: SmolLM2 drafts k pieces (k steps) and Gemma verifies them in one pass; a
  round yields the accepted pieces and the choice of the step that differs from the draft, so
  with a per-piece acceptance `a`, pieces per second against Gemma's own are at most
  (a + ... + a^k + 1 - a^k) * step_G / (k * step_S + pass_k_G).

One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loadtest.pair import pair_configs
from serving.config import TransformersExpertConfig
from serving.models import bundled

PROMPT = "Write a long story about a lighthouse keeper and the sea. Once upon a time, there was"
DRAFTS = (2, 4, 8)
ACCEPTANCE = (0.5, 0.65, 0.8, 0.9)
GATE_SKIPS = (0.5, 0.6, 0.7, 0.8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Expert:
    """One model after the prompt; every timed pass is cropped off again."""

    def __init__(self, config: TransformersExpertConfig) -> None:
        path = bundled.resolve(config.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[config.dtype])
        self.model = model.eval()
        self.prompt = tokenizer(PROMPT, return_tensors="pt").input_ids[:, :24]
        with torch.inference_mode():
            out = self.model(input_ids=self.prompt, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values

    @torch.inference_mode()
    def forward(self, k: int, keep: int, threads: int) -> None:
        torch.set_num_threads(threads)  # per calling thread
        ids = torch.randint(1000, 20000, (1, k))
        out = self.model(
            input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=keep
        )
        torch.log_softmax(out.logits[0, -1].float(), dim=-1).topk(28)  # a view's own work
        self.cache.crop(-k)


def median_ms(work: Callable[[], object], reps: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 1)


def profile(expert: Expert, reps: int) -> dict[str, float]:
    row = {f"step_{t}t": median_ms(partial(expert.forward, 1, 1, t), reps) for t in (1, 2)}
    for k in DRAFTS:
        row[f"pass_{k}_all"] = median_ms(partial(expert.forward, k, k, 1), reps)
        row[f"pass_{k}_last"] = median_ms(partial(expert.forward, k, 1, 1), reps)
    return row


def both_at_once(small: Expert, large: Expert, reps: int) -> float:
    with ThreadPoolExecutor(1) as one, ThreadPoolExecutor(1) as other:

        def pair() -> None:
            a = one.submit(small.forward, 1, 1, 1)
            b = other.submit(large.forward, 1, 1, 1)
            a.result()
            b.result()

        return median_ms(pair, reps)


def best_step(row: dict[str, float]) -> float:
    """An expert's step alone, on whichever thread count is faster."""
    return min(row["step_1t"], row["step_2t"])


def draft_bound(small: dict[str, float], large: dict[str, float]) -> dict[str, dict[str, float]]:
    """Drafted fusion's pieces per second against the large expert's own, by k and acceptance:
    a round of k drafted pieces yields those accepted, and the choice of the step that differs
    from the draft (none when all k are accepted); overheads left out, so a bound."""
    step_large = best_step(large)
    bound = {}
    for k in DRAFTS:
        seconds = k * small["step_1t"] + large[f"pass_{k}_all"]
        pieces = {a: sum(a**i for i in range(1, k + 1)) + 1 - a**k for a in ACCEPTANCE}
        bound[str(k)] = {str(a): round(n * step_large / seconds, 3) for a, n in pieces.items()}
    return bound


def gated_bound(small: dict[str, float], large: dict[str, float], pair: float) -> dict[str, float]:
    """Gated fusion's pieces per second against the large expert's own, by the share of steps
    the primary decides alone."""
    step_large = best_step(large)
    return {
        str(g): round(step_large / (g * small["step_1t"] + (1 - g) * pair), 3) for g in GATE_SKIPS
    }


def main(reps: int) -> None:
    experts = {name: Expert(expert) for name, expert in pair_configs().items()}
    small, large = experts["smollm2-135m-instruct"], experts["gemma3-270m"]
    rows = {name: profile(expert, reps) for name, expert in experts.items()}
    pair = both_at_once(small, large, reps)
    small_row, large_row = rows["smollm2-135m-instruct"], rows["gemma3-270m"]
    report = {
        "ms": rows,
        "both_at_once_ms": pair,
        "ungated_ceiling_of_gemma": round(best_step(large_row) / pair, 3),
        "gated_bound_of_gemma": gated_bound(small_row, large_row, pair),
        "drafted_bound_of_gemma": draft_bound(small_row, large_row),
        "cores": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    main(parser.parse_args().reps)
