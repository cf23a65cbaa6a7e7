"""LoRA fine-tuning of a bundled small model on a task's calibration records (`chorus finetune`).

The records are the project's JSONL (`question`, `answers`): each becomes one chat turn, the
question as the user's message and the first answer as the assistant's, and the loss is on the
answer's tokens only (the model learns to answer, not to ask). Training is CPU-sized: a LoRA
adapter (peft) on the attention projections of the upper half of the layers (the backward pass
then stops halfway down), the frozen weights in bfloat16 (as the experts are served), AdamW, one
record at a time with gradient accumulation, a fixed seed. A checkpoint (adapter, optimizer,
step) is written every `checkpoint_every` steps under `<out>/checkpoint`, and a run started again
with the same arguments resumes from it. The finished adapter is `<out>/adapter_config.json` and
`adapter_model.safetensors`, with `<out>/training.json` saying how it was made.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.models import bundled

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True, slots=True)
class FinetuneSettings:
    model: str  # `bundled:<name>` or a folder
    epochs: float = 1.0
    rank: int = 8
    learning_rate: float = 2e-4
    accumulate: int = 8  # records per optimizer step
    seed: int = 0
    max_length: int = 512  # tokens; longer records are cut from the left (the question's start)
    checkpoint_every: int = 20  # optimizer steps
    dtype: str = "bfloat16"  # of the frozen weights; the adapter trains in float32


def chat_examples(
    tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int
) -> list[tuple[list[int], int]]:
    """Each record as (token ids of the whole turn, where the answer starts), both rendered by
    the model's own chat template (so the answer ends as the template ends a turn)."""
    examples = []
    for record in records:
        question = [{"role": "user", "content": record["question"]}]
        turn = [*question, {"role": "assistant", "content": str(record["answers"][0])}]
        prompt = _ids(tokenizer.apply_chat_template(question, add_generation_prompt=True))
        ids = _ids(tokenizer.apply_chat_template(turn))
        if ids[: len(prompt)] != prompt:
            raise ValueError("the chat template renders the question differently with an answer")
        cut = max(len(ids) - max_length, 0)
        examples.append((ids[cut:], max(len(prompt) - cut, 1)))
    return examples


def _ids(rendered: Any) -> list[int]:
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


def finetune(
    settings: FinetuneSettings,
    records: Sequence[Mapping[str, Any]],
    out: Path,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Train the adapter into `out` (resuming a checkpoint there); returns `out`. `progress` is
    told (step, steps, mean loss of the step) after every optimizer step."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    path = bundled.resolve(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = chat_examples(tokenizer, records, settings.max_length)
    order = _order(len(examples), settings.epochs, settings.seed)
    steps = max(len(order) // settings.accumulate, 1)

    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, settings.dtype))
    layers = int(model.config.num_hidden_layers)
    checkpoint = out / "checkpoint"
    if (checkpoint / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        state = torch.load(checkpoint / "trainer.pt", weights_only=False)
    else:
        lora = LoraConfig(
            r=settings.rank,
            lora_alpha=2 * settings.rank,
            lora_dropout=0.0,  # deterministic steps: a resumed run is the same run
            target_modules=list(LORA_TARGETS),
            layers_to_transform=list(range(layers // 2, layers)),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        state = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * max(0.0, 1 - step / steps)
    )
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = int(state["step"])
    model.train()
    started = time.perf_counter()
    for step in range(start, steps):
        batch = order[step * settings.accumulate : (step + 1) * settings.accumulate]
        total = 0.0
        for index in batch:
            ids, answer_start = examples[index]
            # Logits only where the answer is predicted: the output layer over the whole
            # vocabulary at every prompt position would be most of the work.
            keep = len(ids) - answer_start + 1
            logits = model(input_ids=torch.tensor([ids]), logits_to_keep=keep).logits[0, :-1]
            target = torch.tensor(ids[answer_start:])
            loss = torch.nn.functional.cross_entropy(logits.float(), target) / len(batch)
            loss.backward()  # type: ignore[no-untyped-call]
            total += float(loss.detach())
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(model, optimizer, schedule, step + 1, checkpoint)
        if progress is not None:
            progress(step + 1, steps, total)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # peft's blank model card; training.json says it
    training = {
        **asdict(settings),
        "records": len(records),
        "steps": steps,
        "seconds_this_run": round(time.perf_counter() - started, 1),
    }
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    shutil.rmtree(checkpoint, ignore_errors=True)
    return out


def _order(n: int, epochs: float, seed: int) -> list[int]:
    """Record indices for `epochs` passes (the last one partial), each pass shuffled."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < round(n * epochs):
        order += rng.sample(range(n), n)
    return order[: round(n * epochs)]


def _save_checkpoint(model: Any, optimizer: Any, schedule: Any, step: int, folder: Path) -> None:
    """Written beside, then swapped in: an interrupted save leaves the last checkpoint whole."""
    import torch

    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    torch.save(
        {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step},
        partial / "trainer.pt",
    )
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def read_records(path: Path, category: str | None = None) -> Iterator[dict[str, Any]]:
    with path.open() as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                if category is None or record.get("category") == category:
                    yield record
