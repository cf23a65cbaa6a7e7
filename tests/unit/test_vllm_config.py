"""The `vllm` expert config: engine arguments pass through, typos are refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import ConfigError, VllmExpertConfig, load_config
from tests.conftest import ROOT


def write(tmp_path: Path, engine_args: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        "experts:\n"
        "  small:\n"
        "    engine: vllm\n"
        "    model: bundled:smollm2-135m-instruct\n"
        f"    engine_args: {engine_args}\n"
    )
    return path


def test_shipped_vllm_configs_load() -> None:
    cpu = load_config(ROOT / "configs" / "vllm-cpu.yaml")
    expert = cpu.experts["smollm2-135m-instruct"]
    assert isinstance(expert, VllmExpertConfig)
    assert expert.engine_args["max_model_len"] == 2048
    assert list(cpu.pools["auto"].experts) == ["smollm2-135m-instruct"]
    gpu = load_config(ROOT / "configs" / "vllm-gpu.yaml")
    args = [e.engine_args for e in gpu.experts.values() if isinstance(e, VllmExpertConfig)]
    assert len(args) == 3 and any(a.get("tensor_parallel_size") == 2 for a in args)


def test_engine_args_pass_through_unchanged(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "{gpu_memory_utilization: 0.3, quantization: fp8}"))
    expert = config.experts["small"]
    assert isinstance(expert, VllmExpertConfig)
    assert expert.engine_args == {"gpu_memory_utilization": 0.3, "quantization": "fp8"}


def test_misspelt_engine_arg_is_refused_with_file_key_and_reason(tmp_path: Path) -> None:
    path = write(tmp_path, "{gpu_memory_utilizaton: 0.3}")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: experts.small.engine_args: ")
    assert "'gpu_memory_utilizaton'" in message and "'gpu_memory_utilization'" in message


def test_model_belongs_outside_engine_args(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not in engine_args"):
        load_config(write(tmp_path, "{model: other}"))


def test_kl_centroid_weighting_over_vllm_needs_whole_distributions_at_load(tmp_path: Path) -> None:
    def pool(engine_args: str) -> Path:
        path = write(tmp_path, engine_args)
        path.write_text(
            path.read_text()
            + "  other: {model: bundled:smollm2-135m-instruct}\n"
            + "pools:\n  d: {experts: [small, other],"
            + " strategy: {type: fuse, weighting: kl_centroid}}\n"
        )
        return path

    with pytest.raises(ConfigError) as info:
        load_config(pool("{max_model_len: 2048}"))
    assert "experts.small.engine_args.max_logprobs: pool 'd' uses `kl_centroid` weighting" in str(
        info.value
    )
    load_config(pool("{max_logprobs: -1}"))


def tool_parser_config(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        "experts:\n"
        "  coder:\n"
        "    engine: vllm\n"
        "    model: bundled:qwen2.5-coder-0.5b-instruct\n"
        f"{line}"
    )
    return path


def test_the_tool_parser_is_hermes_unless_the_config_names_another(tmp_path: Path) -> None:
    default = load_config(tool_parser_config(tmp_path, "")).experts["coder"]
    assert isinstance(default, VllmExpertConfig) and default.tool_parser == "hermes"
    named = load_config(tool_parser_config(tmp_path, "    tool_parser: pythonic\n"))
    expert = named.experts["coder"]
    assert isinstance(expert, VllmExpertConfig) and expert.tool_parser == "pythonic"


@pytest.mark.parametrize(("name", "hint"), [("hermess", "did you mean 'hermes'?"), ("qwen", "")])
def test_a_tool_parser_vllm_does_not_have_is_refused_with_file_key_and_reason(
    tmp_path: Path, name: str, hint: str
) -> None:
    path = tool_parser_config(tmp_path, f"    tool_parser: {name}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: experts.coder.tool_parser: ")
    assert f"unknown vLLM tool parser {name!r} ({hint}" in message
    known = message.split("vLLM has: ")[1].rstrip(")").split(", ")
    assert "hermes" in known and "pythonic" in known  # the names it does have
    assert "Traceback" not in message


def test_check_config_refuses_an_unknown_tool_parser(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tool_parser_config(tmp_path, "    tool_parser: hermes3\n")
    done = subprocess.run(
        [sys.executable, "-m", "serving", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"{path}: experts.coder.tool_parser: " in done.stderr
    assert "unknown vLLM tool parser 'hermes3' (did you mean 'hermes'?" in done.stderr
    assert "Traceback" not in done.stderr
