"""Load and benchmark scripts, an installed package: run one as `python loadtest/<script>.py` or
`python -m loadtest.<script>`; the load generator's modules are also imported by tests."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The checkout the scripts belong to: its configs/, and loadtest/RESULTS.md."""
