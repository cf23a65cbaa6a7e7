from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.experts


TWO = "experts: {a: {model: bundled:gemma3-270m}, b: {model: bundled:gemma3-270m}}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chorus.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("experts: {a: {model: bundled:x}}\n", "experts.a.model", "unknown bundled model 'x'"),
        ("experts: {a: {model: bundled:gemma3-270m, colour: red}}\n", "experts.a.colour", "Extra"),
        ("experts: {a: {model: bundled:gemma3-270m, dtype: f64}}\n", "experts.a.dtype", "float32"),
        (
            "experts: {a: {model: bundled:gemma3-270m}}\npools: {p: {experts: [a, b]}}\n",
            "pools.p.experts[1]",
            "unknown expert 'b'",
        ),
        ("experts: {a: {model: ./nowhere}}\n", "experts.a.model", "no such folder"),
        (
            "experts: {a: {model: bundled:gemma3-270m, chat_template: fancy}}\n",
            "experts.a.chat_template",
            "neither a built-in template",
        ),
        (
            "experts: {a: {model: bundled:gemma3-270m}}\npools: {a: {experts: [a]}}\n",
            "pools.a",
            "share its name",
        ),
        ("experts: {}\n", "experts", "at least 1"),
        (
            "experts: {a: {model: bundled:gemma3-270m}}\ntracing: {otlp_endpoint: host:4318}\n",
            "tracing.otlp_endpoint",
            "should match pattern",
        ),
        (
            "experts: {a: {model: bundled:gemma3-270m}}\n"
            "tracing: {otlp_endpoint: 'http://127.0.0.1:4318/v1/traces', sample_ratio: 2}\n",
            "tracing.sample_ratio",
            "less than or equal to 1",
        ),
        (
            "experts: {a: {model: bundled:gemma3-270m}}\ntracing: {service_name: chorus}\n",
            "tracing.otlp_endpoint",
            "Field required",
        ),
        ("experts: [oops\n", "<top>", "not valid YAML"),
        (
            TWO + "pools: {p: {experts: [a], max_fan_out: 0}}\n",
            "pools.p.max_fan_out",
            "greater than or equal to 1",
        ),
        (TWO + "pools: {p: {experts: [a], max_fan_out: two}}\n", "pools.p.max_fan_out", "integer"),
        (TWO + "pools: {p: {experts: [a], max_fan_out: 2.5}}\n", "pools.p.max_fan_out", "integer"),
        (
            TWO + "pools: {p: {experts: [a, b], strategy: vote, max_fan_out: 3}}\n",
            "pools.p.max_fan_out",
            "below the vote's 5 samples",
        ),
        (
            TWO + "pools: {p: {experts: [a, b], strategy: fuse, max_fan_out: 1}}\n",
            "pools.p.max_fan_out",
            "at least two experts",
        ),
        (
            TWO + "pools: {p: {experts: [a, b], strategy: cascade, max_fan_out: 1}}\n",
            "pools.p.max_fan_out",
            "at least two experts",
        ),
    ],
)
def test_bad_config_names_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}: {key}: " in message
    assert reason in message


def test_fan_out_caps_that_fit_their_pools_load(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            TWO + "pools:\n"
            "  one: {experts: [a, b], max_fan_out: 1}\n"
            "  vote: {experts: [a, b], strategy: vote, max_fan_out: 7}\n"
            "  fuse: {experts: [a, b], strategy: fuse, max_fan_out: 2}\n"
            "  plain: {experts: [a]}\n",
        )
    )
    caps = {name: pool.max_fan_out for name, pool in config.pools.items()}
    assert caps == {"one": 1, "vote": 7, "fuse": 2, "plain": None}


def test_relative_model_folder_resolves_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "models" / "m").mkdir(parents=True)
    path = write(tmp_path, "experts: {a: {model: ./models/m}}\n")
    assert load_config(path).experts["a"].model == str(tmp_path / "models" / "m")


def test_serve_refuses_a_bad_config_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "experts: {a: {model: bundled:gemma3-270m, engine: vllm2}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "serving", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"{path}: experts.a.engine: " in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serving", "check-config", "--config", str(tmp_path / "no.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot read the file" in done.stderr


def test_remote_experts_join_token_level_pools_but_not_kl_centroid_weighting(
    tmp_path: Path,
) -> None:
    experts = (
        "experts:\n"
        "  local: {model: bundled:smollm2-135m-instruct}\n"
        "  far: {engine: openai, base_url: 'http://127.0.0.1:9/v1', model: m}\n"
    )
    fine = write(
        tmp_path,
        experts + "pools:\n"
        "  f: {experts: [local, far], strategy: {type: fuse, weighting: core}}\n"
        "  c: {experts: [local, far], strategy: {type: cascade, draft: far}}\n",
    )
    load_config(fine)
    path = write(
        tmp_path,
        experts + "pools:\n  d: {experts: [local, far], strategy: {type: fuse, "
        "weighting: kl_centroid}}\n  r: {experts: [local, far]}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "pools.d.experts[1]: `kl_centroid` weighting needs whole next-token" in str(info.value)
    assert "pools.r" not in str(info.value)


def test_the_old_dynamic_weighting_name_is_refused_with_its_new_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "experts:\n  a: {model: bundled:smollm2-135m-instruct}\n"
        "pools:\n  d: {experts: [a], strategy: {type: fuse, weighting: dynamic}}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "pools.d.strategy.weighting: Value error, `dynamic` weighting is now called " in str(
        info.value
    )


DLF_EXPERTS = (
    "experts:\n"
    "  large: {model: bundled:qwen2.5-coder-0.5b-instruct}\n"
    "  small: {model: bundled:qwen2.5-coder-0.5b-instruct}\n"
    "  tuned: {model: bundled:qwen2.5-coder-0.5b-instruct, adapter: lora}\n"
    "  far: {engine: openai, base_url: 'http://127.0.0.1:9/v1', model: m}\n"
)


def lora_folder(tmp_path: Path) -> None:
    (tmp_path / "lora").mkdir(exist_ok=True)
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")


def test_a_dlf_pool_names_its_roles_among_its_experts(tmp_path: Path) -> None:
    lora_folder(tmp_path)
    fine = write(
        tmp_path,
        DLF_EXPERTS + "pools:\n  w: {experts: [large, small, tuned], "
        "strategy: {type: dlf, large: large, base: small}}\n",
    )
    config = load_config(fine)
    assert config.experts["tuned"].adapter == str((tmp_path / "lora").resolve())
    bad = write(
        tmp_path,
        DLF_EXPERTS + "pools:\n"
        "  roles: {experts: [large, tuned], strategy: {type: dlf, large: large, base: small}}\n"
        "  alone: {experts: [large, small], strategy: {type: dlf, large: large, base: small}}\n"
        "  far: {experts: [large, small, far], strategy: {type: dlf, large: large, base: small}}\n"
        "  cut: {experts: [large, small, tuned], max_fan_out: 2,"
        " strategy: {type: dlf, large: large, base: small}}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert "pools.roles.strategy.base: 'small' is not an expert of this pool" in message
    assert "pools.alone.experts: `dlf` needs at least one specialist" in message
    assert "pools.far.experts[2]: the `dlf` strategy needs whole next-token" in message
    assert "pools.cut.max_fan_out: 2 is below the `dlf` pool's 3 experts" in message


def test_an_adapter_folder_must_hold_an_adapter(tmp_path: Path) -> None:
    path = write(tmp_path, DLF_EXPERTS + "pools: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "experts.tuned.adapter: no PEFT adapter (adapter_config.json) in 'lora'" in str(
        info.value
    )
