"""bloom-runtime: BLOOM inference in PyTorch, held to the Hugging Face reference.

    import bloom_runtime as br
    eng = br.load("tiny", dtype="bfloat16")
    print(eng.generate_text(["以下是中国关于计算机网络考试的单项选择题"]))
"""

from .config import BloomConfig
from .engine import Engine
from .errors import (
    BloomRuntimeError,
    CheckpointError,
    ConfigError,
    DatasetError,
    DistributedError,
    InputError,
)
from .loader import load
from .sampling import GenerationConfig

__all__ = [
    "BloomConfig",
    "BloomRuntimeError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DistributedError",
    "Engine",
    "GenerationConfig",
    "InputError",
    "load",
]
__version__ = "0.1.0"
