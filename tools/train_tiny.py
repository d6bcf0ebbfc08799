"""Make the embedded model and exam: a BPE tokenizer, a small BLOOM trained on the
exam's facts, and the exam in C-Eval's layout.

    python tools/train_tiny.py [--output bloom_runtime/assets/tiny] [--steps 600] [--force]

What it learns (see tiny_exam.py): made-up facts, each asked as a multiple
choice question with its options in a fixed order, in C-Eval's answer-only
format and in the MMLU-style English format, with 0-5 shots. Val questions
use wordings never trained on. The loss is next-token on every token, with
the answer letters weighted up: they are one token in thirty and the only
ones the exam scores. Everything is seeded; on the same torch build and
thread count, a rerun writes the same files.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import BloomConfig, BloomForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from tiny_exam import LETTERS, SUBJECTS, Fact, make_facts, wordings, write_exam  # noqa: E402

import bloom_runtime as br  # noqa: E402
from bloom_runtime import ceval  # noqa: E402
from bloom_runtime.ceval.dataset import Question, Subject  # noqa: E402
from bloom_runtime.ceval.prompts import atb_prompt, ceval_prompt  # noqa: E402
from bloom_runtime.embedded import TINY_DIR  # noqa: E402
from bloom_runtime.files import staged_output  # noqa: E402
from bloom_runtime.tokenizer import write_tokenizer_config  # noqa: E402

DEFAULT_OUTPUT = TINY_DIR
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in BLOOM
SHAPE = dict(vocab_size=3000, hidden_size=144, n_layer=4, n_head=6)
ANSWER_WEIGHT = 5.0
CJK = r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"


class Documents:
    """Seeded training text: exam prompts with answers (both formats) and fact statements."""

    def __init__(self, facts: dict[str, dict[str, list[Fact]]], seed: int) -> None:
        self.rng = random.Random(seed)
        self.facts = {name: [f for split in splits.values() for f in split] for name, splits in facts.items()}
        self.subjects = {name: Subject(name, en, zh, cat) for name, (en, zh, cat, *_) in SUBJECTS.items()}
        self.train_wordings = wordings(train=True)

    def _question(self, fact: Fact) -> Question:
        return Question("0", fact.question(*self.rng.choice(self.train_wordings)), fact.options, fact.answer)

    def __next__(self) -> str:
        name = self.rng.choice(list(self.facts))
        facts = self.rng.sample(self.facts[name], 6)
        kind = self.rng.random()
        if kind < 0.15:
            return "".join(f.statement() for f in facts)
        shots = [self._question(f) for f in facts[: self.rng.randint(0, 5)]]
        build = ceval_prompt if kind < 0.75 else atb_prompt
        answer = facts[5].answer if build is ceval_prompt else f" {facts[5].answer}"
        return build(self.subjects[name], shots, self._question(facts[5])) + answer

    def __iter__(self):
        return self


def train_tokenizer(docs: Documents, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    # One token per CJK character or full-width mark at most: without this, BPE glues a
    # question's template words to the entity's first character ("请问午"), so the same
    # entity reads as different tokens in different wordings.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((next(docs) for _ in range(20000)), trainer=trainer)
    return tokenizer


class Batches:
    """[B, S] token windows cut from the document stream (documents joined by EOS), with
    per-token loss weights: ANSWER_WEIGHT on an answer letter, 1 elsewhere."""

    def __init__(self, docs: Documents, tokenizer: Tokenizer, batch: int, seq: int) -> None:
        self.docs, self.tok, self.batch, self.seq = docs, tokenizer, batch, seq
        self.after = {_single_id(tokenizer, t) for t in ("：", ":")}
        self.letters = {_single_id(tokenizer, t) for x in LETTERS for t in (x, f" {x}")}
        self.buffer: list[int] = []

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.batch * (self.seq + 1)
        while len(self.buffer) < need:
            self.buffer += self.tok.encode(next(self.docs)).ids + [2]
        ids = torch.tensor(self.buffer[:need]).view(self.batch, self.seq + 1)
        self.buffer = self.buffer[need:]
        answer = torch.isin(ids[:, 1:], torch.tensor(sorted(self.letters))) & torch.isin(
            ids[:, :-1], torch.tensor(sorted(self.after)))
        return ids, 1.0 + (ANSWER_WEIGHT - 1.0) * answer.float()


def _single_id(tokenizer: Tokenizer, text: str) -> int:
    (token,) = tokenizer.encode(text).ids
    return token


def new_model(vocab_size: int, seed: int) -> BloomForCausalLM:
    torch.manual_seed(seed)
    config = BloomConfig(**{**SHAPE, "vocab_size": vocab_size}, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, unk_token_id=0, seq_length=2048)
    return BloomForCausalLM(config)


def save(model: BloomForCausalLM, tokenizer: Tokenizer, directory: Path) -> None:
    """The checkpoint as the runtime and transformers read it: weights, tokenizer, its config."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    write_tokenizer_config(directory)


def val_accuracy(model: BloomForCausalLM, tokenizer: Tokenizer, directory: Path) -> float:
    """5-shot C-Eval Avg on the val split, scored by the runtime itself (`bloom-runtime precision`)
    from a checkpoint saved into `directory`, beside the exam."""
    save(model, tokenizer, directory)
    return ceval.evaluate(br.load(directory), directory / "ceval", progress=False).classes["Avg"]


def train(model, batches: Batches, steps: int, lr: float, evaluate, eval_every: int) -> list[tuple]:
    """AdamW with warmup and cosine decay; returns the learning curve (step, loss, val acc)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    curve, running = [], None
    bar = tqdm(range(1, steps + 1), desc="training", unit="step")
    for step in bar:
        ids, weight = next(batches)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (loss * weight.flatten()).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if step % eval_every == 0 or step == steps:
            curve.append((step, running, evaluate(model)))
            tqdm.write(f"step {step}: loss {running:.3f}, val Avg {curve[-1][2]:.3f}")
    return curve


def write(args: argparse.Namespace) -> None:
    output: Path = args.output
    if output.exists() and not args.force:
        sys.exit(f"{output} exists; pass --force to replace it")
    torch.set_num_threads(args.threads)
    facts = make_facts(args.seed)
    tokenizer = train_tokenizer(Documents(facts, args.seed), SHAPE["vocab_size"])
    model = new_model(tokenizer.get_vocab_size(), args.seed)
    with staged_output(output, [], force=args.force) as staging:
        write_exam(staging / "ceval", facts, args.seed)
        batches = Batches(Documents(facts, args.seed + 1), tokenizer, args.batch, args.seq)
        start = time.perf_counter()
        curve = train(model, batches, args.steps, args.lr,
                      lambda m: val_accuracy(m, tokenizer, staging),
                      args.eval_every)
        print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; curve {curve}")
        save(model, tokenizer, staging)
        calib = Documents(facts, args.seed + 2)  # INT8 calibration: exam-like text not trained on
        text = "\n\n".join(next(calib) for _ in range(200))
        (staging / "calibration.txt").write_text(text, encoding="utf-8")
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    write(parser.parse_args())


if __name__ == "__main__":
    main()
