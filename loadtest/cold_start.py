"""Cold start of `chorus serve`: time to an open port, to a healthy server, to a first answer.

    .venv/bin/python loadtest/cold_start.py --config configs/default.yaml [--runs 3]

Starts the real server as a subprocess on a free loopback port, each run from a new process
(models prepared already: preparation is `make install`'s job and is timed separately).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loadtest import ROOT
from loadtest.servers import free_port


def one_run(config: Path, model: str) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "serve", "--config", str(config), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_open = healthy = None
    try:
        while healthy is None:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                status = httpx.get(f"{url}/health", timeout=2).status_code
                port_open = port_open or time.perf_counter() - started
                if status == 200:
                    healthy = time.perf_counter() - started
            except httpx.TransportError:
                time.sleep(0.05)
        body = {"model": model, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 1}
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).raise_for_status()
        first_answer = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"port_open_s": port_open or 0.0, "healthy_s": healthy, "first_answer_s": first_answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = [one_run(args.config, args.model) for _ in range(args.runs)]
    for run in runs:
        print(json.dumps({k: round(v, 2) for k, v in run.items()}))
    medians = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    print(json.dumps({"median": medians, "runs": args.runs}))


if __name__ == "__main__":
    main()
