"""`bloom-runtime serve` in a subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from bloom_runtime.bench.servers import free_port

START_TIMEOUT_S = 180


def wait_for(condition, timeout: float = 60) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.05)


def healthy(url: str) -> bool:
    """Whether the server at `url` answers /health with 200 (False while it cannot be reached)."""
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


class ServerProcess:
    def __init__(self, *args: str, launcher: list[str] | None = None) -> None:
        self.port = free_port()
        command = launcher or [sys.executable, "-m", "bloom_runtime"]
        self.process = subprocess.Popen([*command, "serve", "--port", str(self.port), *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read()
                raise RuntimeError(f"the server exited with {self.process.returncode}: {output}")
            if healthy(self.url):
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {START_TIMEOUT_S} s")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics (0 when absent), by name and labels."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (to the whole session, so torchrun's ranks too) and the exit status."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise
