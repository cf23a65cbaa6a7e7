"""A real `chorus serve` process draining on SIGTERM and reloading its config on SIGHUP."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess

pytestmark = pytest.mark.integration

EXPERT = (
    "experts:\n"
    "  smollm2-135m-instruct:\n"
    "    model: bundled:smollm2-135m-instruct\n"
    "    max_model_len: 2048\n"
)
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]


def write(path: Path, pools: str, server: str = "") -> Path:
    path.write_text(EXPERT + "pools:\n" + pools + server)
    return path


def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)


def metric(srv: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{srv.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


class Stream(threading.Thread):
    """One streamed chat completion read to its end on a thread: its text, finish, errors."""

    def __init__(self, srv: ServerProcess, model: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.srv, self.model, self.max_tokens = srv, model, max_tokens
        self.started = threading.Event()
        self.text = ""
        self.finish: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            stream = client(self.srv).chat.completions.create(
                model=self.model, messages=QUESTION, max_tokens=self.max_tokens,
                temperature=0, stream=True,
            )  # fmt: skip
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    self.text += chunk.choices[0].delta.content
                    self.started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish = chunk.choices[0].finish_reason
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()


def test_sigterm_finishes_streams_in_flight_and_refuses_new_connections(tmp_path: Path) -> None:
    srv = ServerProcess(write(tmp_path / "c.yaml", "  one: {experts: [smollm2-135m-instruct]}\n"))
    try:
        srv.wait_ready(60)
        stream = Stream(srv, "one", max_tokens=48)
        stream.start()
        assert stream.started.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health", timeout=2)
        stream.join(60)
        assert stream.error is None
        assert stream.finish in ("length", "stop")
        assert len(stream.text) > 20
        srv.proc.wait(timeout=30)
    finally:
        srv.stop()


def test_sigterm_cuts_what_outlasts_the_grace_period(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.yaml",
        "  one: {experts: [smollm2-135m-instruct]}\n",
        "server: {shutdown_grace_s: 1}\n",
    )
    srv = ServerProcess(config)
    try:
        srv.wait_ready(60)
        stream = Stream(srv, "one", max_tokens=1500)
        stream.start()
        assert stream.started.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        srv.proc.wait(timeout=30)
        assert time.monotonic() - signalled < 10
        stream.join(10)
        assert stream.finish is None  # cut, not finished
    finally:
        srv.stop()


def test_sighup_reloads_the_config_and_refuses_a_bad_one(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "  one: {experts: [smollm2-135m-instruct]}\n")
    srv = ServerProcess(path)
    try:
        srv.wait_ready(60)
        before = client(srv).chat.completions.create(
            model="one", messages=QUESTION, max_tokens=8, temperature=0
        )
        in_flight = Stream(srv, "one", max_tokens=40)
        in_flight.start()
        assert in_flight.started.wait(30)

        write(path, "  two: {experts: [smollm2-135m-instruct]}\n")
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while metric(srv, "chorus_config_reloads_total", result="ok") < 1:
            assert time.monotonic() < deadline, "the reload did not happen"
            time.sleep(0.1)
        models = {m.id for m in client(srv).models.list()}
        assert "two" in models and "one" not in models
        after = client(srv).chat.completions.create(
            model="two", messages=QUESTION, max_tokens=8, temperature=0
        )
        assert after.choices[0].message.content == before.choices[0].message.content
        in_flight.join(60)
        assert in_flight.error is None and in_flight.finish is not None

        # Refused: the pool names an expert that does not exist.
        path.write_text(EXPERT + "pools:\n  three: {experts: [nobody]}\n")
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while metric(srv, "chorus_config_reloads_total", result="refused") < 1:
            assert time.monotonic() < deadline, "the bad config was not refused"
            time.sleep(0.1)
        assert httpx.get(f"{srv.url}/health").status_code == 200
        still = client(srv).chat.completions.create(
            model="two", messages=QUESTION, max_tokens=8, temperature=0
        )
        assert still.choices[0].message.content == before.choices[0].message.content
    finally:
        srv.stop()


def test_reloads_under_load_lose_no_request(tmp_path: Path) -> None:
    configs = [
        "  one: {experts: [smollm2-135m-instruct]}\n",
        "  one: {experts: [smollm2-135m-instruct]}\n  two: {experts: [smollm2-135m-instruct]}\n",
    ]
    path = write(tmp_path / "c.yaml", configs[0])
    srv = ServerProcess(path)
    try:
        srv.wait_ready(60)
        stop = threading.Event()
        finished: list[Stream] = []

        def load() -> None:
            while not stop.is_set():
                stream = Stream(srv, "one", max_tokens=12)
                stream.run()
                finished.append(stream)

        workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for worker in workers:
            worker.start()
        for i in range(4):
            time.sleep(1.5)
            write(path, configs[(i + 1) % 2])
            srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while metric(srv, "chorus_config_reloads_total", result="ok") < 4:
            assert time.monotonic() < deadline, "not every reload happened"
            time.sleep(0.1)
        during = len(finished)
        while len(finished) < during + len(workers):  # and requests keep being served after
            assert time.monotonic() < deadline + 60, "requests stopped being answered"
            time.sleep(0.1)
        stop.set()
        for worker in workers:
            worker.join(60)
        assert [s.error for s in finished if s.error] == []
        assert all(s.finish is not None and s.text for s in finished)
    finally:
        srv.stop()
