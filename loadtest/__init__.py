"""Load and benchmark scripts (run as files; `load.py` is also imported by tests)."""
