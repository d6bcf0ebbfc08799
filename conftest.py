"""Options shared by every suite, and the fixtures that read them.

    pytest --device cuda --dtype bfloat16    # where the runtime runs: conformance, dtype, INT8,
                                             #   accuracy tests; --dtype narrows the dtype-parametrized ones
    pytest --model-path DIR                  # also conform a real checkpoint to transformers
    pytest --model-path DIR --ceval-path DIR -m accuracy  # the bloom-7b1 rows of the accuracy table
    pytest --tp 4                            # world size of the tensor-parallel tests (default 2)

Tests that need what is not there (a GPU, an NPU, a real checkpoint) skip with the reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The suites' helpers (hf_checkpoints, random_batches, spawn_ranks) import by name; appended, so
# that no installed package is ever shadowed by them.
sys.path.append(str(Path(__file__).parent / "tests_functional"))


def pytest_configure(config: pytest.Config) -> None:
    """Kernel decisions go to a cache of this run's own (subprocesses inherit it), so every run
    probes this machine afresh and leaves the user's cache alone."""
    import tempfile

    from bloom_runtime.kernels.selection import CACHE_DIR_ENV

    if not config.option.collectonly:
        os.environ[CACHE_DIR_ENV] = tempfile.mkdtemp(prefix="bloom-runtime-kernels-")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bloom-runtime")
    group.addoption("--model-path", default=None, help="a real BLOOM checkpoint directory")
    group.addoption("--device", default="cpu", help="device for the runtime under test")
    group.addoption("--dtype", default=None, help="restrict dtype-parametrized tests to one dtype")
    group.addoption("--tp", type=int, default=2, help="world size of the tensor-parallel tests")
    group.addoption("--ceval-path", default=None,
                    help="a directory with ceval-exam/ and subject_mapping.json")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The runtime's device, skipping the test when it is not present here."""
    from bloom_runtime.device import resolve
    from bloom_runtime.errors import InputError

    name = request.config.getoption("--device")
    try:
        resolve(name)
    except InputError as err:
        pytest.skip(str(err))
    return name


@pytest.fixture(scope="session")
def reference_device() -> torch.device:
    """Where the Hugging Face float32 reference runs: CUDA when there is one, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tp_size(request: pytest.FixtureRequest) -> int:
    size = request.config.getoption("--tp")
    if size < 2:
        pytest.skip(f"--tp {size}: tensor-parallel tests need 2 ranks or more")
    return size


@pytest.fixture(scope="session")
def model_path(request: pytest.FixtureRequest) -> Path:
    path = request.config.getoption("--model-path")
    if path is None:
        pytest.skip("no --model-path given: this test needs a real BLOOM checkpoint")
    return Path(path)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`dtype` parametrizes over the reduced-precision dtypes, or the one --dtype names."""
    if "dtype" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--dtype")
        metafunc.parametrize("dtype", [chosen] if chosen else ["bfloat16", "float16"])
