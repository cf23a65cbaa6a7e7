"""Reading a config file: validate it into `serving.config.schema` models and cross-check it.

A bad file is refused with the file, the key path and the reason (`ConfigError`), never a
traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from router.artifact import RouterArtifact
from router.costs import MEASURED_UNIT, CostModel
from serving.config.schema import (
    BUILTIN_CHAT_TEMPLATES,
    ENGINE_TAGS,
    STRATEGY_TAGS,
    CascadeStrategyConfig,
    Config,
    DlfStrategyConfig,
    ExpertConfig,
    FuseStrategyConfig,
    OpenAIExpertConfig,
    PoolConfig,
    Price,
    TransformersExpertConfig,
    VllmExpertConfig,
    VoteStrategyConfig,
)
from serving.models import bundled


class ConfigError(Exception):
    """A config file that cannot be served; `str()` is the message for the operator."""

    def __init__(self, file: Path | str, problems: list[tuple[str, str]]) -> None:
        self.file = str(file)
        self.problems = problems
        lines = [f"{self.file}: {path or '<top>'}: {reason}" for path, reason in problems]
        super().__init__("\n".join(lines))


def load_config(path: Path | str, *, check_artifacts: bool = True) -> Config:
    """Read, validate and cross-check a config file; raise `ConfigError` on any problem.

    `check_artifacts=False` skips loading router artifacts (for the commands that make them).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(path, [("", f"cannot read the file: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, [("", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(path, [("", "expected a mapping with `experts` and `pools`")])
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems = [(_error_path(err), err["msg"]) for err in exc.errors()]
        raise ConfigError(path, problems) from None
    problems = _cross_check(config, base_dir=path.parent)
    if problems:
        raise ConfigError(path, problems)
    config = _resolve_paths(config, base_dir=path.parent)
    if check_artifacts:
        problems = _check_artifacts(config)
        if problems:
            raise ConfigError(path, problems)
    return config


def _check_artifacts(config: Config) -> list[tuple[str, str]]:
    from router.artifact import ArtifactError, check_compatible, load

    problems = []
    for name, pool in config.pools.items():
        if pool.router is None:
            continue
        try:
            artifact = load(Path(pool.router.artifact))
            check_compatible(artifact, experts=pool.experts, embedder=config.router.embedder)
        except ArtifactError as exc:
            problems.append((f"pools.{name}.router.artifact", str(exc)))
            continue
        problems += _check_costs(config, name, artifact)
    return problems


def _check_costs(config: Config, name: str, artifact: RouterArtifact) -> list[tuple[str, str]]:
    """A pool that trades accuracy for cost needs a router that knows costs, reckoned as the
    config prices its experts now."""
    pool = config.pools[name]
    fitted = artifact.costs
    if not fitted:
        if pool.quality_weight < 1:
            return [
                (
                    f"pools.{name}.quality_weight",
                    "below 1 needs a router fitted with costs; refit it with `chorus router fit` "
                    "from records that `chorus calibrate` wrote (they hold tokens and seconds)",
                )
            ]
        return []
    problems = []
    for expert in pool.experts:
        price = config.experts[expert].price
        if price is None and fitted[expert].unit != MEASURED_UNIT:
            reason = f"was priced in {fitted[expert].unit} when the router was fitted"
        elif price is not None and fitted[expert] != priced(price):
            reason = "has another price than when the router was fitted"
        else:
            continue
        problems.append(
            (f"experts.{expert}.price", f"{reason}; refit pools.{name}.router.artifact")
        )
    return problems


def priced(price: Price) -> CostModel:
    return CostModel.priced(price.prompt, price.completion, price.unit)


def key_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a readable key path: `pools.auto.experts[1]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_type_tag(str(part)):
            out += f".{part}" if out else str(part)
    return out


def _error_path(error: Any) -> str:
    loc = list(error["loc"])
    # A tagged union puts the tag it tried into the location: experts.a.transformers.dtype.
    if len(loc) > 2 and loc[0] == "experts" and loc[2] in ENGINE_TAGS:
        del loc[2]
    if len(loc) > 3 and loc[0] == "pools" and loc[2] == "strategy" and loc[3] in STRATEGY_TAGS:
        del loc[3]
    path = key_path(loc)
    if error["type"] == "union_tag_invalid":  # the tag itself is wrong: name its key
        path += "." + str(error["ctx"]["discriminator"]).strip("'")
    return path


def _is_type_tag(part: str) -> bool:
    # Pydantic adds the union member or validator it tried ("str", "list[...]", "function-after").
    return part.startswith(("function-", "list[", "tagged-union[")) or part in ("str", "int")


def _cross_check(config: Config, base_dir: Path) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for name in sorted(set(config.experts) & set(config.pools)):
        problems.append((f"pools.{name}", "a pool cannot share its name with an expert"))
    for name, expert in config.experts.items():
        if not isinstance(expert, TransformersExpertConfig | VllmExpertConfig):
            continue  # a remote model name is the remote server's business
        problem = _check_model_ref(expert.model, base_dir)
        if problem:
            problems.append((f"experts.{name}.model", problem))
        adapter = expert.adapter if isinstance(expert, TransformersExpertConfig) else None
        if adapter is not None and not (base_dir / adapter / "adapter_config.json").is_file():
            problems.append(
                (f"experts.{name}.adapter", f"no PEFT adapter (adapter_config.json) in {adapter!r}")
            )
        template = expert.chat_template
        if (
            template is not None
            and template not in BUILTIN_CHAT_TEMPLATES
            and not (base_dir / template).is_file()
        ):
            problems.append(
                (
                    f"experts.{name}.chat_template",
                    f"{template!r} is neither a built-in template "
                    f"({', '.join(BUILTIN_CHAT_TEMPLATES)}) nor an existing file",
                )
            )
    for pool_name, pool in config.pools.items():
        for i, member in enumerate(pool.experts):
            if member not in config.experts:
                known = ", ".join(sorted(config.experts))
                problems.append(
                    (
                        f"pools.{pool_name}.experts[{i}]",
                        f"unknown expert {member!r} (known: {known})",
                    )
                )
        if len(set(pool.experts)) != len(pool.experts):
            problems.append((f"pools.{pool_name}.experts", "an expert is listed twice"))
        strategy = pool.strategy
        needs_full = {"kl_centroid": "`kl_centroid` weighting", "dlf": "the `dlf` strategy"}.get(
            strategy.weighting if isinstance(strategy, FuseStrategyConfig) else strategy.type
        )
        if needs_full:
            problems += _check_whole_distributions(config, pool_name, pool, needs_full)
        if isinstance(strategy, DlfStrategyConfig):
            problems += _check_dlf_roles(pool_name, pool, strategy)
        if isinstance(strategy, FuseStrategyConfig):
            for name in set(strategy.weights) - set(pool.experts):
                problems.append(
                    (f"pools.{pool_name}.strategy.weights.{name}", "not an expert of this pool")
                )
            if strategy.weighting == "static" and not any(strategy.weights.values()):
                problems.append(
                    (f"pools.{pool_name}.strategy.weights", "`static` weighting needs weights")
                )
        problems += _check_fan_out(pool_name, pool)
        if isinstance(strategy, CascadeStrategyConfig) and strategy.draft not in (
            None,
            *pool.experts,
        ):
            problems.append(
                (f"pools.{pool_name}.strategy.draft", f"{strategy.draft!r} is not in the pool")
            )
    problem = _check_model_ref(config.router.embedder, base_dir)
    if problem:
        problems.append(("router.embedder", problem))
    return problems


def _check_whole_distributions(
    config: Config, pool_name: str, pool: PoolConfig, what: str
) -> list[tuple[str, str]]:
    """Fusing whole next-token distributions needs engines that give them."""
    problems = []
    for i, member in enumerate(pool.experts):
        member_config = config.experts.get(member)
        if isinstance(member_config, OpenAIExpertConfig):
            problems.append(
                (
                    f"pools.{pool_name}.experts[{i}]",
                    f"{what} needs whole next-token distributions, which the "
                    f"`{member_config.engine}` engine's decode sessions do not give (only the "
                    "top logprobs)",
                )
            )
        if (
            isinstance(member_config, VllmExpertConfig)
            and member_config.engine_args.get("max_logprobs") != -1
        ):
            problems.append(
                (
                    f"experts.{member}.engine_args.max_logprobs",
                    f"pool {pool_name!r} uses {what}, which needs whole next-token "
                    "distributions from vLLM: set `max_logprobs: -1`",
                )
            )
    return problems


def _check_dlf_roles(
    pool_name: str, pool: PoolConfig, strategy: DlfStrategyConfig
) -> list[tuple[str, str]]:
    """`large` and `base` are two of the pool's experts; at least one other is a specialist;
    the roles are fixed, so no router reorders them."""
    key = f"pools.{pool_name}.strategy"
    problems = [
        (f"{key}.{role}", f"{name!r} is not an expert of this pool")
        for role, name in (("large", strategy.large), ("base", strategy.base))
        if name not in pool.experts
    ]
    if strategy.large == strategy.base:
        problems.append((f"{key}.base", "the base must be another expert than the large one"))
    if not set(pool.experts) - {strategy.large, strategy.base}:
        problems.append(
            (
                f"pools.{pool_name}.experts",
                "`dlf` needs at least one specialist besides the large and base experts",
            )
        )
    if pool.router is not None:
        problems.append(
            (f"pools.{pool_name}.router", "a `dlf` pool's experts have fixed roles: no router")
        )
    return problems


def _check_fan_out(name: str, pool: PoolConfig) -> list[tuple[str, str]]:
    """A fan-out cap that would cut every request the same way is a mistake in the pool's
    other settings: say which."""
    cap, strategy = pool.max_fan_out, pool.strategy
    if cap is None:
        return []
    key = f"pools.{name}.max_fan_out"
    if isinstance(strategy, VoteStrategyConfig) and cap < strategy.samples:
        return [
            (
                key,
                f"{cap} is below the vote's {strategy.samples} samples: every vote would be cut "
                f"to {cap}; lower `strategy.samples` instead",
            )
        ]
    if isinstance(strategy, DlfStrategyConfig) and cap < len(pool.experts):
        return [
            (
                key,
                f"{cap} is below the `dlf` pool's {len(pool.experts)} experts, which all decode "
                "every step: a specialist left out leaves the large model alone",
            )
        ]
    token_level = isinstance(strategy, FuseStrategyConfig | CascadeStrategyConfig)
    if token_level and cap < 2 and len(pool.experts) > 1:
        return [
            (
                key,
                f"a `{strategy.type}` pool decodes with at least two experts at once; 1 leaves "
                "its first expert alone (use a `single` pool for that)",
            )
        ]
    return []


def _check_model_ref(ref: str, base_dir: Path) -> str | None:
    if ref.startswith("bundled:"):
        name = ref.removeprefix("bundled:")
        if name not in bundled.BUNDLED:
            return f"unknown bundled model {name!r} (known: {', '.join(sorted(bundled.BUNDLED))})"
        return None
    if ref.startswith((".", "/", "~")) and not (base_dir / Path(ref).expanduser()).is_dir():
        return f"no such folder: {ref}"
    return None


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    """Make local folders and template files absolute, so the config no longer needs its file."""

    def local(ref: str) -> str:
        if ref.startswith((".", "/", "~")):
            return str((base_dir / Path(ref).expanduser()).resolve())
        return ref

    experts: dict[str, ExpertConfig] = {
        name: expert.model_copy(
            update={
                "model": local(expert.model),
                **(
                    {"adapter": str((base_dir / expert.adapter).resolve())}
                    if isinstance(expert, TransformersExpertConfig) and expert.adapter
                    else {}
                ),
                "chat_template": (
                    expert.chat_template
                    if expert.chat_template in (None, *BUILTIN_CHAT_TEMPLATES)
                    else str((base_dir / str(expert.chat_template)).resolve())
                ),
            }
        )
        if isinstance(expert, TransformersExpertConfig | VllmExpertConfig)
        else expert
        for name, expert in config.experts.items()
    }
    pools = {
        name: pool.model_copy(
            update={
                "router": pool.router.model_copy(
                    update={"artifact": str((base_dir / pool.router.artifact).resolve())}
                )
            }
        )
        if pool.router is not None
        else pool
        for name, pool in config.pools.items()
    }
    router = config.router.model_copy(update={"embedder": local(config.router.embedder)})
    return config.model_copy(update={"experts": experts, "router": router, "pools": pools})
