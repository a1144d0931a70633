"""A qwen3 server on a free loopback port, in a background thread of the test process.

In-process (rather than a subprocess) so tests can look inside the engine it serves — free KV blocks,
unfinished requests — while talking to it over real HTTP.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI

from qwen3.llm import LLM
from qwen3.server import ServerConfig, create_app
from qwen3.server.serving import ServerState


def wait_healthy(process: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    """Wait until a ``qwen3 serve`` subprocess answers 200 on /health (fails with its output if it exits)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stdout.read() if process.stdout else "qwen3 serve exited"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "qwen3 serve did not come up"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    llm: LLM
    app: FastAPI
    url: str  # http://127.0.0.1:PORT

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def state(self) -> ServerState:
        return self.app.state.qwen3

    def wait_idle(self, timeout: float = 10.0) -> float:
        """Seconds until the engine holds no request and no KV block (raises if it never does)."""
        engine = self.llm.engine
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks:
                return time.perf_counter() - start
            time.sleep(0.01)
        raise AssertionError(
            f"engine still busy after {timeout} s: {len(engine.requests)} requests, "
            f"{engine.blocks.num_used} blocks in use"
        )


@contextmanager
def live_server(llm: LLM, config: ServerConfig) -> Iterator[LiveServer]:
    app = create_app(llm, config)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, log_level="warning", access_log=False
        )
    )
    thread = threading.Thread(target=server.run, name="qwen3-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(llm, app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
