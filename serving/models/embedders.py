"""Building the router's embedder from a config reference, on torch or ONNX Runtime."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from router.embedder import Embedder, SentenceTransformerEmbedder
from router.onnx import OnnxEmbedder, export
from serving.models import bundled

logger = logging.getLogger(__name__)


def onnx_folder(reference: str) -> Path:
    """Where the ONNX export of a reference is cached (keyed by what the reference points at)."""
    source = bundled.resolve(reference)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    slug = Path(reference.removeprefix("bundled:")).name or "embedder"
    return bundled.chorus_home() / "onnx" / f"{slug}-{digest}"


def load_embedder(reference: str, backend: str = "onnx") -> Embedder:
    """The embedder named by `reference`; exported to ONNX once (and cached) for `onnx`."""
    if backend == "torch":
        return SentenceTransformerEmbedder(reference, bundled.resolve(reference))
    folder = onnx_folder(reference)
    if not (folder / "onnx.json").exists():
        logger.info("exporting %s to ONNX at %s (once)", reference, folder)
        export(bundled.resolve(reference), folder)
    return OnnxEmbedder(reference, folder)
