"""`bloom-runtime` / `python -m bloom_runtime`: the command line.

Each subcommand is a small function over the public API. A user's mistake
(a `BloomRuntimeError`) is printed on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import BloomConfig
from .errors import BloomRuntimeError, InputError
from .loader import DTYPES, Source, canonical_dtype, load, parameter_count
from .parallel import shutdown
from .quant import LINEARS, QuantSpec
from .sampling import GenerationConfig
from .tokenizer import left_pad

REPORTS = ("pandas", "numpy", "matplotlib")  # the reports extra: result tables and plots

SEPARATOR = "### prompt"  # the line before each of several prompts' outputs

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}
# `weights quant --scheme` + `--activation`: the W8A8 activation choices, by scheme name
W8A8_ACTIVATIONS = {"dynamic": "w8a8", "static": "w8a8-static", "static-asym": "w8a8-static-asym"}
WRITTEN = ["w8a8"] + [name for name in LINEARS if name not in W8A8_ACTIVATIONS.values()]  # --scheme


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (embedded, default), a checkpoint directory, or random:<preset>")


def _runtime_args(parser: argparse.ArgumentParser) -> None:
    _model_args(parser)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), type=canonical_dtype,
                        help="dtype of the float parts")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:i] or npu[:i]")
    parser.add_argument("--quant", default=None, choices=list(LINEARS),
                        help="quantize on load (a quantized checkpoint needs none)")


def cmd_generate(args: argparse.Namespace) -> None:
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    ignored = GenerationConfig(**sampling).ignored_sampling_settings()
    if ignored:  # as transformers warns: greedy decoding reads none of them
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        print(f"bloom-runtime: warning: greedy decoding ignores {flags}; add --do-sample to sample",
              file=sys.stderr)
    prompts = _prompts(args.prompt, args.file)
    engine = load(args.model, dtype=args.dtype, device=args.device, quant=args.quant)
    say = print if engine.shard.is_main else _silent  # every rank computes, rank 0 prints
    if args.token_ids:
        for row in _generate_ids(engine, prompts, sampling):
            say(" ".join(map(str, row)))
    elif len(prompts) == 1:  # as it comes
        say(prompts[0], end="", flush=True)
        for piece in engine.stream_text(prompts[0], **sampling):
            say(piece, end="", flush=True)
        say()
    else:  # continuations may hold newlines: a header line before each
        for number, (prompt, text) in enumerate(zip(prompts, engine.generate_text(prompts, **sampling)), 1):
            say(f"{SEPARATOR} {number}/{len(prompts)}")
            say(prompt + text)


def _silent(*_args, **_kwargs) -> None:
    pass


def _prompts(given: list[str], file: str | None) -> list[str]:
    """Prompts from the command line, or one per line of `file` (`-`, or a lone `-` prompt: stdin)."""
    if file is None and given == ["-"]:
        file = "-"
    if file is not None:
        if given and given != ["-"]:
            raise InputError("give prompts on the command line or with --file, not both")
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"--file {file}: cannot read ({err})") from None
        given = [line for line in text.splitlines() if line.strip()]
    if not given:
        raise InputError(f"no prompts: give some, or a file with one per line (--file {file or 'F'})")
    return given


def _generate_ids(engine, prompts: list[str], sampling: dict) -> list[list[int]]:
    """Prompts given as space-separated token ids, one batch, left-padded: for tokenizer-less models."""
    try:
        rows = [[int(tok) for tok in prompt.split()] for prompt in prompts]
    except ValueError:
        raise InputError("--token-ids: prompts must be space-separated integers, e.g. '5 17 42'") from None
    if any(not row for row in rows):
        raise InputError("--token-ids: a prompt has no ids")
    ids, mask = left_pad(rows, engine.config.pad_token_id)
    new = engine.generate(ids, mask, eos_token_id=engine.config.eos_token_id, **sampling)
    return new.tolist()


def describe(config: BloomConfig) -> list[tuple[str, str]]:
    """(field, value) rows that `info` prints: the shape, size, and bytes per dtype."""
    params = parameter_count(config)
    rows = [
        ("vocab_size", str(config.vocab_size)),
        ("hidden_size", str(config.hidden_size)),
        ("n_layer", str(config.n_layer)),
        ("n_head", str(config.n_head)),
        ("head_dim", str(config.head_dim)),
        ("post_layernorm_residual", str(config.apply_residual_connection_post_layernorm)),
        ("parameters", f"{params:,} ({params / 1e9:.3f} B)"),
    ]
    rows += [(f"bytes[{name}]", f"{params * size:,} ({params * size / 2**30:.2f} GiB)")
             for name, size in BYTES_PER_ELEMENT.items()]
    return rows


def cmd_info(args: argparse.Namespace) -> None:
    from .kernels import describe as describe_kernels
    from .loader import kernel_decisions

    source = Source.resolve(args.model)
    print(f"model: {source.name}")
    for field, value in describe(source.config):
        print(f"{field:>24}: {value}")
    decisions = kernel_decisions(args.model, args.dtype, args.quant, args.device)
    scheme = args.quant or (source.quant_spec.linear if source.quant_spec else "float")
    print(f"\nkernels on this machine ({args.dtype}, {scheme}, {args.device}; ms per call, "
          f"by rows; probed once, then cached):")
    print(describe_kernels(decisions) if decisions else
          f"    none to choose: {args.dtype} linears run F.linear")


def cmd_weights_quant(args: argparse.Namespace) -> None:
    from .weights import checkpoint_bytes, quantize_checkpoint

    default = QuantSpec.written(W8A8_ACTIVATIONS[args.activation] if args.scheme == "w8a8" else args.scheme)
    alpha = args.alpha if args.alpha is not None else default.alpha
    smooths = default.linear_class.ACTIVATIONS is not None and not args.no_smooth
    spec = QuantSpec(default.linear, alpha=alpha if smooths else None,
                     float_layers=tuple(args.float_layers), head=None if args.float_head else default.head)
    out = quantize_checkpoint(args.input, args.output, spec, calib_samples=args.calib_samples,
                              calib_data=args.calib_data, dtype=args.dtype, seed=args.seed, force=args.force)
    activations = spec.linear_class.ACTIVATIONS
    print(f"wrote {out} ({spec.linear}, activations {args.activation if activations else 'float'}, "
          f"{checkpoint_bytes(out) / 2**20:.1f} MiB)")


def cmd_weights_cut(args: argparse.Namespace) -> None:
    from .weights import checkpoint_bytes, cut_checkpoint

    out = cut_checkpoint(args.input, args.output, args.tp, force=args.force)
    print(f"wrote {out} (tp={args.tp}, {checkpoint_bytes(out) / 2**20:.1f} MiB)")


def _weights_parser(sub) -> None:
    weights = sub.add_parser("weights", help="prepare checkpoints: quantize, cut for tensor parallelism")
    tools = weights.add_subparsers(dest="tool", required=True)
    quant = tools.add_parser("quant", help=f"quantize a float checkpoint ({', '.join(LINEARS)}; "
                                           "compressed-tensors)")
    quant.add_argument("--input", required=True, help="a float Hugging Face BLOOM directory")
    quant.add_argument("--output", required=True)
    quant.add_argument("--scheme", default="w8a8", choices=WRITTEN)
    quant.add_argument("--activation", default="dynamic", choices=list(W8A8_ACTIVATIONS),
                       help="W8A8 activations: per-token dynamic, per-tensor static, or static "
                            "asymmetric (the Ascend modelslim recipe)")
    quant.add_argument("--alpha", type=float, default=None,
                       help="SmoothQuant migration strength (default: the scheme's, 0.5 for w8a8; w4a8 "
                            "does not smooth unless given one)")
    quant.add_argument("--no-smooth", action="store_true", help="skip SmoothQuant (as modelslim does)")
    quant.add_argument("--float-layers", type=int, nargs="*", default=[],
                       help="blocks kept in float, e.g. 7 as the guide did for bloom-7b1")
    quant.add_argument("--float-head", action="store_true",
                       help="keep the tied embedding/head in float; without it the head is quantized with "
                            "the scheme where other engines can read that form, else as int8 rows "
                            "(w4a16 writes an int8 head; quantize-on-load keeps it int4)")
    quant.add_argument("--calib-samples", type=int, default=16, help="128-token calibration windows")
    quant.add_argument("--calib-data", default=None, help="a UTF-8 text file (default: embedded text)")
    quant.add_argument("--dtype", default="float32", choices=sorted(DTYPES), type=canonical_dtype,
                       help="dtype of the parts that stay float")
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument("--force", action="store_true", help="replace an existing output")
    quant.set_defaults(func=cmd_weights_quant)

    cut = tools.add_parser("cut", help="cut a float or quantized checkpoint into one part per TP rank")
    cut.add_argument("--input", required=True)
    cut.add_argument("--output", required=True)
    cut.add_argument("--tp", type=int, required=True, help="tensor-parallel size (number of ranks)")
    cut.add_argument("--force", action="store_true", help="replace an existing output")
    cut.set_defaults(func=cmd_weights_cut)


def cmd_perf(args: argparse.Namespace) -> None:
    _require("reports", *REPORTS)
    from .bench import cases, export, harness

    if args.seqlen_in_pair or args.seqlen_out_pair:
        grid = cases.from_pairs(args.batch, args.seqlen_in_pair or [], args.seqlen_out_pair or [])
    else:
        grid = cases.from_ranges(args.batch, tuple(args.seqlen_in_range), tuple(args.seqlen_out_range))
    opts = harness.PerfOptions(
        cases=grid, model=args.model, dtype=args.dtype, device=args.device, quant=args.quant,
        warmup=args.warmup, repeat=args.repeat, compare=tuple(args.compare), threads=args.threads,
        output=Path(args.output), cache=Path(args.peer_cache), seed=args.seed,
    )  # fmt: skip
    rows, meta, is_main = harness.run(opts)
    if is_main:
        print(export.table(export.frame(rows)))
        print("\naverage over the grid (ms):")
        for engine, figures in meta["grid_average"].items():
            print(f"  {engine:>14}: first token {figures['TimeOfFirstToken(ms)']:.2f}, "
                  f"next token {figures['TimePerToken(ms)']:.2f}")
        stem = Path(args.output).with_suffix("")
        print(f"wrote {stem}.csv, {stem}.json, {stem}.png")


def _perf_parser(sub) -> None:
    from .bench.peers import DEFAULT_CACHE, PEERS

    perf = sub.add_parser("perf", help="first/next-token latency over a grid of lengths, vs peers")
    _runtime_args(perf)
    perf.add_argument("--batch", type=int, nargs="+", default=[1])
    perf.add_argument("--seqlen-in-range", type=int, nargs=2, default=[5, 10], metavar=("A", "B"),
                      help="input lengths 2^A..2^B (default 5 10)")
    perf.add_argument("--seqlen-out-range", type=int, nargs=2, default=[5, 10], metavar=("A", "B"))
    perf.add_argument("--seqlen-in-pair", type=int, nargs="+", help="zipped with --seqlen-out-pair")
    perf.add_argument("--seqlen-out-pair", type=int, nargs="+")
    perf.add_argument("--warmup", type=int, default=1)
    perf.add_argument("--repeat", type=int, default=3)
    perf.add_argument("--compare", nargs="*", default=[], choices=list(PEERS))
    perf.add_argument("--threads", type=int, default=None, help="CPU threads for every engine")
    perf.add_argument("--output", default="perf_results.csv", help="FILE.csv or FILE.json (both are written)")
    perf.add_argument("--peer-cache", default=str(DEFAULT_CACHE),
                      help="where random presets and CTranslate2 conversions are kept")
    perf.add_argument("--seed", type=int, default=0)
    perf.set_defaults(func=cmd_perf)


def _require(extra: str, *modules: str) -> None:
    """Refuse, in one line, a command whose extra is not installed (the core declares only what
    the core imports: pyproject.toml)."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"this command needs the {extra} extra: pip install \"bloom-runtime[{extra}]\" "
                         f"(from a clone: pip install -e \".[{extra}]\"); missing: {', '.join(missing)}")


def cmd_serve(args: argparse.Namespace) -> None:
    _require("serve", "fastapi", "uvicorn", "prometheus_client")
    from .serving.app import create_app, serve
    from .serving.scheduler import follow
    for flag in ("max_batch_size", "max_waiting", "max_batch_tokens", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise InputError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    engine = load(args.model, dtype=args.dtype, device=args.device, quant=args.quant,
                  max_seq_len=args.max_model_len)
    if not engine.shard.is_main:  # under torchrun: run rank 0's batch on this rank's part
        follow(engine, args.max_batch_size)
        return
    app = create_app(engine, args.served_model_name or args.model, args.max_batch_size, args.max_waiting,
                     args.max_batch_tokens, Path(args.chat_template) if args.chat_template else None,
                     static=args.batching == "static", max_body_bytes=args.max_body_bytes,
                     scheduler_thread=False)
    name = args.served_model_name or args.model
    print(f"bloom-runtime: serving {name} on http://{args.host}:{args.port}/v1 (tp={engine.shard.world}, "
          f"up to {args.max_batch_size} sequences a step)", file=sys.stderr, flush=True)
    serve(app, args.host, args.port)


def cmd_perf_serve(args: argparse.Namespace) -> None:
    _require("reports", *REPORTS)
    _require("serve", "httpx", "fastapi", "uvicorn")
    import contextlib
    import functools
    import math

    import httpx
    import torch

    from .bench.peers import shared_checkpoint
    from .bench.roofline import BandwidthBeside
    from .bench.servers import Running, Setting, servable, started
    from .bench.serving import Load, measure, verdicts

    rates = [math.inf if r == "inf" else float(r) for r in args.request_rate]
    if any(not r > 0 for r in rates) or args.num_prompts < 1 or args.input_len < 1 or args.output_len < 2:
        raise InputError("--request-rate must be > 0 (or inf), --num-prompts and --input-len >= 1, "
                         "--output-len >= 2 (TPOT needs two tokens)")
    output = Path(args.output)
    if not 0 <= args.random_range_ratio < 1:
        raise InputError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    spread = f" ±{args.random_range_ratio:.0%}" if args.random_range_ratio else ""
    meta = {"title": f"perf serve: in={args.input_len} out={args.output_len}{spread} n={args.num_prompts}",
            "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
            "random_range_ratio": args.random_range_ratio}
    if args.url:
        model = httpx.get(args.url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]
        given = Running("url", args.url.rstrip("/"), model, args.url)
        servers = {"url": lambda: contextlib.nullcontext(given)}
        vocab = args.vocab_size
    else:
        cache = Path(args.peer_cache)
        source = Path(shared_checkpoint(args.model, args.seed, cache))
        directory = servable(source, cache)
        vocab = BloomConfig.from_json(directory / "config.json").vocab_size
        longest = round((args.input_len + args.output_len) * (1 + args.random_range_ratio)) + 1
        setting = Setting(source, directory, args.dtype, args.quant, args.threads, args.max_batch_size,
                          longest, cache)
        meta |= {"model": args.model, "dtype": args.dtype, "quant": args.quant, "threads": args.threads,
                 "max_batch_size": args.max_batch_size}
        servers = {name: functools.partial(started, name, setting) for name in ["ours", *args.compare]}
    load = Load(rates, args.num_prompts, args.input_len, args.output_len, args.max_concurrency, vocab,
                args.seed, args.random_range_ratio)
    beside = None if args.url else BandwidthBeside(torch.device("cpu"))  # the servers started here
    rows = measure(servers, load, output, meta, beside)
    columns = ["server", "load", "completed", "failed", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
               "median_tpot_ms", "p99_tpot_ms", "p99_itl_ms", "memory_bandwidth_GBps"]
    import pandas as pd

    print(pd.DataFrame(rows).reindex(columns=columns).to_string(index=False, float_format="%.1f"))
    for verdict in verdicts(rows):
        print(f"vs {verdict['peer']} at rate {verdict['at_rate']}: output throughput "
              f"{verdict['output_throughput_ratio']:.2f}x, p99 TTFT {verdict['p99_ttft_ratio']:.2f}x"
              + ("" if verdict["reached_2x"] else " (its p99 TPOT never reached 2x its batch-1 TPOT)"))
    print(f"results: {output.with_suffix('')}.csv/.json/.png")


def _perf_serve_parser(sub) -> None:
    from .bench.peers import DEFAULT_CACHE
    from .bench.servers import SERVERS

    perf = sub.add_parser("perf-serve", help="'perf serve': load an OpenAI-compatible server (ours, or "
                                             "--url), beside llama-server, vLLM and static batching")
    _runtime_args(perf)
    perf.add_argument("--url", default=None, help="measure the server at this URL instead of starting ours")
    perf.add_argument("--compare", nargs="*", default=[], choices=[s for s in SERVERS if s != "ours"])
    perf.add_argument("--request-rate", nargs="+", default=["inf"],
                      help="requests per second, Poisson arrivals; 'inf': all at once (default)")
    perf.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    perf.add_argument("--num-prompts", type=int, default=32)
    perf.add_argument("--input-len", type=int, default=128)
    perf.add_argument("--output-len", type=int, default=64)
    perf.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="lengths uniform in [L(1-r), L(1+r)] (vLLM's option; 0: all exactly L)")
    perf.add_argument("--max-batch-size", type=int, default=8, help="sequences per step, every server")
    perf.add_argument("--threads", type=int, default=2, help="CPU threads, every server")
    perf.add_argument("--vocab-size", type=int, default=250880,
                      help="with --url: random prompt ids are below it")
    perf.add_argument("--output", default="perf_serve.json", help="FILE.json or FILE.csv (both, and a PNG)")
    perf.add_argument("--peer-cache", default=str(DEFAULT_CACHE))
    perf.add_argument("--seed", type=int, default=0)
    perf.set_defaults(func=cmd_perf_serve)


def _serve_parser(sub) -> None:
    from .serving.protocol import MAX_BODY_BYTES

    serve = sub.add_parser("serve", help="an OpenAI-compatible completions server with continuous batching")
    _runtime_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients use (default: --model)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="most sequences decoded together")
    serve.add_argument("--max-waiting", type=int, default=64,
                       help="most requests queued; beyond it requests get 429 with Retry-After")
    serve.add_argument("--max-batch-tokens", type=int, default=2048,
                       help="most prompt tokens prefilled together when requests join (one always fits)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="the context a request may fill, prompt and new tokens (default: the model's)")
    serve.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                       help="largest request body taken; a larger one gets 413 before it is read")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a Jinja chat template, to serve /v1/chat/completions (BLOOM has none)")
    serve.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                       help="static: admit only into an empty batch (to measure what continuous buys)")
    serve.set_defaults(func=cmd_serve)


def cmd_precision(args: argparse.Namespace) -> None:
    _require("reports", *REPORTS)
    from .ceval.evaluation import evaluate

    engine = load(args.model, dtype=args.dtype, device=args.device, quant=args.quant)
    run = {"model": args.model, "dtype": args.dtype, "quant": args.quant, "tp": engine.shard.world}
    result = evaluate(engine, args.dataset_path, method=args.method, shots=args.shots, batch=args.batch,
                            output_dir=args.output_dir, run=run, force=args.force, subjects=args.subjects)
    if not engine.shard.is_main:
        return
    from .ceval.report import IN_WORDS, category_table

    classes = result.classes
    print(category_table(classes))
    unfit = classes["unfit"]
    print(f"{classes['questions']} questions, method {args.method}: {IN_WORDS[classes['aggregation']]}"
          + (f"; {len(unfit)} did not fit and count as wrong: {', '.join(unfit)}" if unfit else ""))
    print(f"wrote {Path(args.output_dir) / 'result_classes_acc.json'} and the per-subject results beside it")
    if args.diff:
        _print_diff(Path(args.diff), Path(args.output_dir))


def _print_diff(other: Path, ours: Path) -> None:
    from .ceval.cache import diff

    changed = diff(other, ours)
    print(f"{len(changed)} question(s) answered differently from {other}")
    for theirs, mine in changed:
        mark = "fixed" if mine.correct else "broken" if theirs.correct else "still wrong"
        print(f"  {mine.subject}/{mine.id}: {theirs.choice} -> {mine.choice} (answer {mine.answer}, {mark})")


def _precision_parser(sub) -> None:
    prec = sub.add_parser("precision", help="C-Eval accuracy (default: the embedded model and exam)")
    _runtime_args(prec)
    prec.add_argument("--dataset-path", default=None,
                      help="directory with ceval-exam/ and subject_mapping.json (default: the embedded exam)")
    prec.add_argument("--shots", type=int, default=5, help="dev examples before each question (0..5)")
    prec.add_argument("--method", default="ceval", choices=["ceval", "atb"],
                      help="ceval: official answer-only logits; atb: the guide's evaluator (generation)")
    prec.add_argument("--batch", type=int, default=8)
    prec.add_argument("--output-dir", default="test_result",
                      help="results and the per-question record a rerun resumes from")
    prec.add_argument("--subjects", nargs="+", default=None, help="score only these subjects")
    prec.add_argument("--force", action="store_true",
                      help="discard a record in --output-dir left by a run with other settings")
    prec.add_argument("--diff", default=None, metavar="OTHER_OUTPUT_DIR",
                      help="afterwards, list the questions answered differently from that run")
    prec.set_defaults(func=cmd_precision)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's --help shows each option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="bloom-runtime", description="BLOOM inference runtime")
    parser.add_argument("--version", action="version", version=f"bloom-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue one or more prompts")
    _runtime_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    gen.add_argument("--temperature", type=float, default=1.0, help="with --do-sample: softmax temperature")
    gen.add_argument("--top-k", type=int, default=0, help="with --do-sample: keep the k most likely (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="with --do-sample: keep the most likely tokens up to this mass (1: off)")
    gen.add_argument("--seed", type=int, default=None, help="with --do-sample: seed (default: random)")
    gen.add_argument("--token-ids", action="store_true",
                     help="prompts are space-separated token ids and the output is ids "
                          "(for models without a tokenizer, e.g. random:<preset>)")
    gen.add_argument("prompt", nargs="*",
                     help="text to continue: one is streamed as it is generated; several run as one "
                          "left-padded batch, each printed after a '### prompt N/M' line; '-' reads stdin")
    gen.add_argument("--file", default=None, metavar="F",
                     help="read prompts from F, one per line ('-': stdin)")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="shape, parameter count and size of a model, and which kernel "
                                       "serves each of its matmuls on this machine")
    _runtime_args(info)
    info.set_defaults(func=cmd_info)

    _serve_parser(sub)
    _perf_parser(sub)
    _perf_serve_parser(sub)
    _precision_parser(sub)
    _weights_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["perf", "serve"]:  # `perf serve` is its own command with its own options
        argv = ["perf-serve", *argv[2:]]
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BloomRuntimeError as err:
        print(f"bloom-runtime: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bloom-runtime: interrupted; {_kept(args)}", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves behind, in the words a rerun needs."""
    if args.command == "precision":
        from .ceval.cache import answered

        count = answered(Path(args.output_dir))
        return f"{count} answers kept in {args.output_dir}; rerun the same command to resume"
    if args.command == "weights":
        return f"nothing was written: {args.output} appears only when complete"
    if args.command == "perf" and args.output:
        return f"the cases measured so far are in {Path(args.output).with_suffix('')}.csv/.json/.png"
    return "nothing was kept"
