"""`chorus finetune` on a tiny random-weight Qwen2 with the real Qwen tokenizer (its chat template
decides where the answer starts): the loss is on the answer only, a fixed seed repeats a run, and
a run interrupted after a checkpoint resumes to the very adapter an uninterrupted run makes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from serving.models import bundled
from serving.models.finetune import FinetuneSettings, chat_examples, finetune

pytestmark = pytest.mark.integration

RECORDS = [
    {"question": f"What is {a} plus {b}? Answer with the number only.", "answers": [str(a + b)]}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen")
    tokenizer = AutoTokenizer.from_pretrained(bundled.prepare("qwen2.5-coder-0.5b-instruct"))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def settings(tiny: Path, **changes: int) -> FinetuneSettings:
    return FinetuneSettings(
        model=str(tiny), accumulate=2, checkpoint_every=1, learning_rate=1e-2, **changes
    )


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_the_answer_starts_after_the_rendered_question(tiny: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    (ids, start), *_ = chat_examples(tokenizer, RECORDS[:1], max_length=512)
    assert tokenizer.decode(ids[start:]) == "3<|im_end|>\n"
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_an_interrupted_run_resumes_to_the_same_adapter(tiny: Path, tmp_path: Path) -> None:
    whole = finetune(settings(tiny), RECORDS, tmp_path / "whole")
    assert not (whole / "checkpoint").exists()

    class Interrupted(Exception):
        pass

    def stop_after_two(step: int, steps: int, loss: float) -> None:
        assert steps == 4 and loss > 0
        if step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune(settings(tiny), RECORDS, tmp_path / "resumed", stop_after_two)
    assert (tmp_path / "resumed" / "checkpoint" / "trainer.pt").is_file()
    seen: list[int] = []
    finetune(settings(tiny), RECORDS, tmp_path / "resumed", lambda s, *_: seen.append(s))
    assert seen == [3, 4]  # steps 1 and 2 were not run again
    got, want = adapter(tmp_path / "resumed"), adapter(whole)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    again = finetune(settings(tiny), RECORDS, tmp_path / "again")
    for name in want:
        torch.testing.assert_close(adapter(again)[name], want[name])
    moved = [n for n in want if "lora_B" in n and want[n].abs().max() > 0]
    assert moved  # B starts at zero in LoRA: training moved it
    shutil.rmtree(tmp_path / "again")
