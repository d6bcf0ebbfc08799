"""Make the embedded model: a byte-level BPE tokenizer and a small random BLOOM.

    python tools/make_tiny.py [--output bloom_runtime/assets/tiny] [--force]

The tokenizer is trained with `tokenizers` on text from tiny_corpus.py and the
checkpoint is written by `transformers.BloomForCausalLM.save_pretrained`, so
the embedded model is a real Hugging Face checkpoint that both engines load.
Everything is seeded: running the script twice gives the same files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BloomConfig, BloomForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from tiny_corpus import corpus  # noqa: E402

from bloom_runtime.tokenizer import write_tokenizer_config  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).parents[1] / "bloom_runtime" / "assets" / "tiny"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in BLOOM
SHAPE = dict(vocab_size=3000, hidden_size=144, n_layer=4, n_head=6)


def train_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(20000, seed), trainer=trainer)
    return tokenizer


def random_model(vocab_size: int, seed: int) -> BloomForCausalLM:
    torch.manual_seed(seed)
    config = BloomConfig(**{**SHAPE, "vocab_size": vocab_size}, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, unk_token_id=0, seq_length=2048)
    return BloomForCausalLM(config).eval()


def write(output: Path, force: bool, seed: int) -> None:
    if output.exists() and any(output.iterdir()) and not force:
        sys.exit(f"{output} exists and is not empty; pass --force to replace it")
    tokenizer = train_tokenizer(SHAPE["vocab_size"], seed)
    model = random_model(tokenizer.get_vocab_size(), seed)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=".tiny-"))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save(str(staging / "tokenizer.json"))
        write_tokenizer_config(staging)
        # INT8 calibration text: same generator, another seed, so not the tokenizer's own text.
        (staging / "calibration.txt").write_text("".join(corpus(400, seed + 1)), encoding="utf-8")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args()
    write(args.output, args.force, args.seed)


if __name__ == "__main__":
    main()
