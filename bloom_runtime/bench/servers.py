"""The servers `perf serve` measures, each started as its own process on a loopback port, on the
same weights: ours (continuous and static batching), llama.cpp's `llama-server` (parallel slots,
continuous batching, on the GGUF the latency suite writes) and vLLM's CPU backend (from its own
virtual environment: tools/install_vllm_cpu.sh).

A server that does not come up within its start timeout is reported as failed with the end of
its log; every server is stopped (SIGTERM, then SIGKILL) when measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError
from ..tokenizer import FILENAME as TOKENIZER_FILE

SERVERS = ("ours", "static", "llama-server", "vllm")
START_TIMEOUT_S = {"ours": 300, "static": 300, "llama-server": 300, "vllm": 900}
VLLM_ENV = "BLOOM_RUNTIME_VLLM_PYTHON"  # the python of vLLM's own venv (default: .venv-vllm/bin/python)
VLLM_DEFAULT = Path(".venv-vllm/bin/python")  # where tools/install_vllm_cpu.sh puts it


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every server is asked to run."""

    source: Path  # the float checkpoint as given (a random preset's has no tokenizer)
    directory: Path  # the same with a tokenizer (`servable`): what the servers load
    dtype: str
    quant: str | None
    threads: int
    max_batch: int
    max_len: int  # prompt + output, per sequence
    cache: Path


@dataclasses.dataclass(frozen=True)
class Running:
    name: str
    url: str
    model: str
    describe: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(name: str, setting: Setting) -> Iterator[Running]:
    """Server `name` running on `setting`, stopped on exit."""
    port = free_port()
    command, describe = _command(name, setting, port)
    env = {**os.environ, "OMP_NUM_THREADS": str(setting.threads), "VLLM_CPU_KVCACHE_SPACE": "4"}
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(process, url, START_TIMEOUT_S[name], log, name)
        yield Running(name, url, "model", describe)
    finally:
        _stop(process)
        log.close()


def _command(name: str, setting: Setting, port: int) -> tuple[list[str], str]:
    if name in ("ours", "static"):
        command = [sys.executable, "-m", "bloom_runtime", "serve", "--model", str(_ours(setting)),
                   "--dtype", setting.dtype, "--port", str(port), "--served-model-name", "model",
                   "--max-batch-size", str(setting.max_batch), "--max-waiting", "100000",
                   "--batching", "static" if name == "static" else "continuous"]
        return command, f"bloom-runtime {setting.quant or setting.dtype}, {name} batching"
    if name == "llama-server":
        from .llamacpp import gguf_file
        from .peers import fingerprint

        binary = shutil.which("llama-server")
        if binary is None:
            raise InputError("llama-server is not on PATH: run tools/install_llama_server.sh")
        gguf, kind = gguf_file(setting.directory, setting.cache / fingerprint(setting.directory),
                               setting.dtype, setting.quant, setting.threads)
        slots = str(setting.max_batch)
        threads = str(setting.threads)
        command = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", threads,
                   "-tb", threads, "-np", slots, "-c", str(setting.max_batch * setting.max_len),
                   "--cont-batching", "-a", "model", "--no-webui"]
        return command, f"llama.cpp llama-server {kind}, {slots} slots"
    if name == "vllm":
        python = Path(os.environ.get(VLLM_ENV, VLLM_DEFAULT))
        if not python.is_file():
            raise InputError(f"vLLM's python {python} is not there: run tools/install_vllm_cpu.sh (or set "
                             f"{VLLM_ENV})")
        dtype = "float32" if setting.dtype == "float32" else "bfloat16"
        # The module, not the `vllm` script: vllm-cpu's script asks for the distribution "vllm".
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(setting.directory),
                   "--host", "127.0.0.1", "--port", str(port),
                   "--served-model-name", "model", "--dtype", dtype, "--max-model-len", str(setting.max_len),
                   "--max-num-seqs", str(setting.max_batch)]
        return command, f"vLLM CPU {dtype}, up to {setting.max_batch} sequences"
    raise InputError(f"unknown server {name!r}: choose from {', '.join(SERVERS)}")


def _wait_healthy(process: subprocess.Popen, url: str, timeout: float, log, name: str) -> None:
    import httpx  # the serve extra: the CLI reads SERVERS from here to build its parser

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode}: {_tail(log)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not answer /health within {timeout:.0f} s: {_tail(log)}")


def _tail(log, chars: int = 800) -> str:
    log.seek(0)
    return " | ".join(log.read()[-chars:].splitlines())


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _ours(setting: Setting) -> Path:
    """What our server loads: the float checkpoint, or for a scheme that checkpoint quantized once
    into the cache, as on load (same spec and calibration: text with a real tokenizer, seeded
    random ids without one), then given the placeholder tokenizer. Quantizing the servable copy
    instead would calibrate on the placeholder tokenizer's reading of the calibration text."""
    if setting.quant is None:
        return setting.directory
    from ..quant import QuantSpec
    from ..weights import quantize_checkpoint
    from .peers import fingerprint

    quantized = setting.cache / fingerprint(setting.source) / f"serve-{setting.quant}-{setting.dtype}"
    if not (quantized / "config.json").is_file():
        quantize_checkpoint(setting.source, quantized, QuantSpec.from_name(setting.quant),
                            dtype=setting.dtype, force=True)
    return servable(quantized, setting.cache)


def servable(directory: Path, cache: Path) -> Path:
    """`directory` if it has a tokenizer, else a copy of it (links) with the placeholder one the
    latency suite's peers use: every server needs one, a random preset has none."""
    if (directory / TOKENIZER_FILE).is_file():
        return directory
    from ..files import staged_output
    from .peers import fingerprint
    from .runners import link_with_placeholder_tokenizer

    target = cache / fingerprint(directory) / "servable"
    if not (target / TOKENIZER_FILE).is_file():
        with staged_output(target, [directory], force=True) as staging:
            link_with_placeholder_tokenizer(directory, staging)
    return target
