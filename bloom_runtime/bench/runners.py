"""The engines a latency run compares: ours, Hugging Face transformers, CTranslate2.

Each runner loads the same checkpoint directory and generates exactly `seq_out`
tokens greedily (EOS ignored) for the same prompt ids, returning the time at
which each new token's ids were on the host, measured from when the input ids
were ready.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from ..engine import Engine
from ..errors import InputError
from ..files import staged_output
from ..tokenizer import FILENAME as TOKENIZER_FILE
from ..tokenizer import write_tokenizer_config


class OursRunner:
    name = "bloom-runtime"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def arrivals(self, ids: torch.Tensor, seq_out: int) -> list[float]:
        times = []
        start = time.perf_counter()
        for token in self.engine.stream(ids, max_new_tokens=seq_out):
            token.cpu()  # on the host: for an accelerator this waits for the step
            times.append(time.perf_counter() - start)
        return times


class HFRunner:
    name = "hf"

    def __init__(self, directory: Path, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import BloomForCausalLM

        self.model = BloomForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
        self.device = device
        self.describe = f"transformers BloomForCausalLM dtype={dtype}"

    def arrivals(self, ids: torch.Tensor, seq_out: int) -> list[float]:
        from transformers.generation.streamers import BaseStreamer

        times: list[float] = []
        start = time.perf_counter()

        class Clock(BaseStreamer):
            prompt_seen = False

            def put(self, value: torch.Tensor) -> None:  # first call: the prompt itself
                if self.prompt_seen:
                    times.append(time.perf_counter() - start)
                self.prompt_seen = True

            def end(self) -> None:
                pass

        with torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids, device=self.device),
                max_new_tokens=seq_out, min_new_tokens=seq_out, do_sample=False, streamer=Clock(),
                pad_token_id=self.model.config.pad_token_id,
            )  # fmt: skip
        return times


class CTranslate2Runner:
    name = "ctranslate2"

    def __init__(self, directory: Path, cache: Path, compute_type: str, threads: int, device: torch.device):
        try:
            import ctranslate2
        except ImportError:
            raise InputError("--compare ctranslate2 needs the ctranslate2 package (pip install '.[peers]')") \
                from None
        if compute_type not in ctranslate2.get_supported_compute_types(device.type):
            compute_type = "float32"  # the closest this device offers (no bfloat16 on most CPUs)
        self.describe = f"ctranslate2 {ctranslate2.__version__} compute_type={compute_type}"
        converted = cache / f"ct2-{compute_type}"
        if not (converted / "model.bin").is_file():
            _convert(directory, converted, compute_type)
        self.generator = ctranslate2.Generator(str(converted), device=device.type, compute_type=compute_type,
                                               intra_threads=threads)
        self.vocab = _vocabulary(converted)

    def arrivals(self, ids: torch.Tensor, seq_out: int) -> list[float]:
        prompts = [[self.vocab[i] for i in row] for row in ids.tolist()]
        times: list[float] = []
        start = time.perf_counter()

        def step(result) -> None:
            if result.batch_id == 0:
                times.append(time.perf_counter() - start)

        self.generator.generate_batch(prompts, max_length=seq_out, min_length=seq_out, sampling_topk=1,
                                      include_prompt_in_result=False, callback=step)  # fmt: skip
        return times


def _convert(directory: Path, output: Path, compute_type: str) -> None:
    """Convert once into the cache; a checkpoint without a tokenizer gets a placeholder one."""
    from ctranslate2.converters import TransformersConverter

    quantization = "int8" if compute_type.startswith("int8") else compute_type
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as view, \
            staged_output(output, [directory], force=True) as staging:
        source = directory
        if not (directory / TOKENIZER_FILE).is_file():
            source = Path(view)
            link_with_placeholder_tokenizer(directory, source)
        TransformersConverter(str(source)).convert(str(staging), quantization=quantization, force=True)


def link_with_placeholder_tokenizer(directory: Path, target: Path) -> None:
    """`target` (an empty directory) as `directory`'s files, linked, plus a placeholder tokenizer:
    what a peer that needs a tokenizer loads for a checkpoint that has none (a random preset)."""
    for file in directory.iterdir():
        (target / file.name).symlink_to(file.resolve())
    placeholder_tokenizer(json.loads((directory / "config.json").read_text())["vocab_size"], target)


def placeholder_tokenizer(vocab_size: int, directory: Path) -> None:
    """A word-level tokenizer naming id i "t{i}": CTranslate2 takes prompts as token strings."""
    from tokenizers import Tokenizer, models

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(directory / TOKENIZER_FILE))
    write_tokenizer_config(directory)


def _vocabulary(converted: Path) -> list[str]:
    return json.loads((converted / "vocabulary.json").read_text(encoding="utf-8"))
