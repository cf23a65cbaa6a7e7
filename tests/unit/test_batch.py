"""Padding, merging, dropping and trimming rows of a `PaddedBatch`, on tiny random-weight models.

Every row's logits must be those of its sequence decoded alone, whatever else shares the batch,
including sliding-window layers (Gemma 3) once sequences outgrow the window.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from serving.engines.transformers.batch import PaddedBatch

torch.manual_seed(0)


def tiny_llama() -> Any:
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_gemma3() -> Any:
    config = Gemma3TextConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=6,  # short, so sequences outgrow it and the cache truncates
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


MODELS = {"llama": tiny_llama, "gemma3-sliding": tiny_gemma3}


def alone(model: Any, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Greedy logits of `prompt` decoded by itself: after the prompt, then after each token."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, logits = out.past_key_values, [out.logits[0, -1]]
        for _ in range(steps):
            token = logits[-1].argmax().view(1, 1)
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
    return logits


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", MODELS)
def test_rows_decode_as_if_alone_through_merges_drops_and_trims(kind: str) -> None:
    model = MODELS[kind]()
    prompts = {"a": prompt(3, 1), "b": prompt(11, 2), "c": prompt(2, 3), "d": prompt(20, 4)}
    steps = 12
    expected = {name: alone(model, p, steps) for name, p in prompts.items()}

    # a and b start together (b is longer: a is left-padded).
    batch, logits = PaddedBatch.prefill(model, [prompts["a"], prompts["b"]])
    names = ["a", "b"]
    seen = dict.fromkeys(prompts, 0)  # steps of each sequence checked so far

    def check(logits: torch.Tensor) -> torch.Tensor:
        for row, name in enumerate(names):
            torch.testing.assert_close(
                logits[row], expected[name][seen[name]], atol=1e-4, rtol=1e-4
            )
            seen[name] += 1
        return logits.argmax(-1)

    tokens = check(logits)
    for step in range(steps):
        logits = batch.step(model, tokens)
        tokens = check(logits)
        if step == 1:  # c joins a running batch, shorter than it is by now
            new, new_logits = PaddedBatch.prefill(model, [prompts["c"]])
            batch.extend(new)
            names.append("c")
            tokens = torch.cat([tokens, check_one(new_logits, expected["c"], seen, "c")])
        if step == 3:  # b (the longest) leaves: common padding is trimmed
            keep = [row for row, name in enumerate(names) if name != "b"]
            batch.select(keep)
            tokens = tokens[keep]
            names = [names[row] for row in keep]
            assert int(batch.mask[:, 0].max()) == 1  # no column is padding in every row
        if step == 5:  # d joins, longer than every live row: they are padded
            new, new_logits = PaddedBatch.prefill(model, [prompts["d"]])
            batch.extend(new)
            names.append("d")
            tokens = torch.cat([tokens, check_one(new_logits, expected["d"], seen, "d")])
        if seen["a"] > steps:
            break
    assert batch.length == max(len(prompts[n]) + seen[n] - 1 for n in names)
    assert all(seen[name] > 3 for name in prompts)


def check_one(
    logits: torch.Tensor, expected: list[torch.Tensor], seen: dict[str, int], name: str
) -> torch.Tensor:
    torch.testing.assert_close(logits[0], expected[0], atol=1e-4, rtol=1e-4)
    seen[name] = 1
    return logits.argmax(-1)


def test_select_repeats_rows_for_samples_and_empties() -> None:
    model = tiny_llama()
    batch, logits = PaddedBatch.prefill(model, [prompt(4, 5), prompt(7, 6)])
    batch.select([0, 0, 0, 1])  # three samples of the first prompt, one of the second
    assert batch.rows == 4 and batch.positions.tolist() == [4, 4, 4, 7]
    out = batch.step(model, logits[[0, 0, 0, 1]].argmax(-1))
    torch.testing.assert_close(out[0], out[1])
    batch.select([])
    assert batch.rows == 0 and batch.cache is None
