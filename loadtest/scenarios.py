"""What the load generator sends: the scenarios (targets and prompts) and their request schedule."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

SHORT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "What is 7 times 8?",
    "Give the opposite of the word 'hot'.",
    "What is the chemical symbol for gold?",
    "Write one sentence about the sea.",
    "What is the plural of 'mouse'?",
    "What is the past tense of 'run'?",
    "What number comes after 41?",
    "Name a fruit that is yellow.",
    "What is 15 plus 27?",
    "What is the capital of Japan?",
    "Tell me a short fact about cats.",
    "What is the opposite of 'early'?",
    "What is the chemical symbol for iron?",
    "Say hello in French.",
)

_FACTS = (
    "The river Alder rises in the northern hills and flows south for 212 kilometres.",
    "Its largest tributary, the Bree, joins it at the market town of Holm.",
    "Holm was founded in 1143 as a toll station on the old salt road.",
    "The town's bridge was rebuilt in stone in 1572 after a flood destroyed the timber one.",
    "Wool, leather and later paper were the main trades of the valley.",
    "A canal built in 1791 linked the Alder to the port of Saltmouth.",
    "The railway arrived in 1848 and the canal closed to traffic in 1921.",
    "Today the valley is known for its orchards, mostly apples and pears.",
)


def _long_prompt(question: str, repeats: int = 6) -> str:
    text = " ".join(f"({i + 1}) {fact}" for i in range(repeats) for fact in _FACTS)
    return f"Read this passage, then answer the question.\n\n{text}\n\nQuestion: {question}"


LONG_PROMPTS: tuple[str, ...] = tuple(
    _long_prompt(q)
    for q in (
        "When was the bridge at Holm rebuilt?",
        "Which river joins the Alder at Holm?",
        "When did the railway arrive?",
        "What fruit grows in the valley?",
        "How long is the river Alder?",
    )
)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    targets: tuple[str, ...]
    prompts: tuple[str, ...]
    streams: tuple[bool, ...] = (False, True)
    """Cycled over rounds: every target gets the same mode in one round."""
    compare: tuple[str, str] | None = None
    """(routed pool, expert): the report gives p50(routed) / p50(expert) per concurrency."""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "standard",
            "the routed pool `auto` and the expert `smollm2-135m-instruct`, interleaved; "
            "short questions, half streamed",
            ("auto", "smollm2-135m-instruct"),
            SHORT_PROMPTS,
            compare=("auto", "smollm2-135m-instruct"),
        ),
        Scenario(
            "long-prompt",
            "about 1,060-token passages with a question, `auto` and `smollm2-135m-instruct`",
            ("auto", "smollm2-135m-instruct"),
            LONG_PROMPTS,
            compare=("auto", "smollm2-135m-instruct"),
        ),
        Scenario(
            "pools-mixed",
            "every model id of the default config: both experts and the auto, vote, fuse pools",
            ("auto", "smollm2-135m-instruct", "gemma3-270m", "vote", "fuse"),
            SHORT_PROMPTS,
            compare=("auto", "smollm2-135m-instruct"),
        ),
        Scenario(
            "expert",
            "the expert `smollm2-135m-instruct` alone",
            ("smollm2-135m-instruct",),
            SHORT_PROMPTS,
        ),
    )
}


@dataclass(frozen=True)
class Job:
    target: str
    prompt: str
    stream: bool
    round: int


def jobs_for(scenario: Scenario, rounds: int | None) -> Iterator[Job]:
    """Round k: every target (rotated by k, so none always goes first) with one prompt and mode.

    Modes cycle round by round; when the number of prompts is a multiple of the number of modes,
    the cycle shifts once per pass over the prompts, so each prompt is sent in every mode.
    `rounds=None` goes on forever (duration mode).
    """
    counter = itertools.count() if rounds is None else range(rounds)
    n_targets, n_prompts = len(scenario.targets), len(scenario.prompts)
    n_modes = len(scenario.streams)
    for k in counter:
        prompt = scenario.prompts[k % n_prompts]
        shift = k // n_prompts if n_prompts % n_modes == 0 else 0
        stream = scenario.streams[(k + shift) % n_modes]
        for j in range(n_targets):
            yield Job(scenario.targets[(k + j) % n_targets], prompt, stream, k)
