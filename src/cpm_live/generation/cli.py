"""``src/text_generation.py``: fill in the ``"<ans>"`` of every record of a jsonl file with CPM-Bee.

    python src/text_generation.py --model-config src/config/cpm-bee-10b.json --load cpm-bee-10b.pt \\
        --input in.jsonl --output out.jsonl --beam-size 3 --max-length 100 --repetition-penalty 1.1
    # a Hugging Face model directory (config.json, weights, vocab.txt): no --model-config / --vocab
    python src/text_generation.py --load cpm-bee-10b/ --input in.jsonl --output out.jsonl
    # LoRA adapter (peft directory or CPM-Bee *-delta-best.pt), 4-bit base from an int4 config:
    python src/text_generation.py --model-config cpm-bee-10b-int4.json --load model-int4.safetensors \\
        --delta results/adapter --input in.jsonl --output out.jsonl
    # sampling instead of beam search (or --greedy):
    ... --sampling --top-k 0 --top-p 0.9 --temperature 0.9 --seed 1234

The config is ``--model-config`` or the ``config.json`` of a ``--load`` directory; the vocab is
``--vocab`` or ``vocab.txt`` beside (or inside) ``--load``. CPM-Bee's ``--use-bminf`` and
``--memory-limit`` are accepted and ignored with a warning (BMInf is not used). Every input line must be a JSON
object with an ``"<ans>"`` key; all lines are checked (and tokenized) before the model is loaded, and
a bad one, or a prompt longer than ``--max-prompt-length`` tokens (default: the config's
``position_bias_max_distance``), stops the run with its file and line number.

Output is streamed: one line per input record, in input order, written and flushed as soon as its
batch is done, so a crash loses at most the batch in progress (the file then holds the first
records). ``--output`` may not be one of the inputs, and an existing file is replaced only with
``--force`` (checked before the model loads). ``--device cpu`` runs a ``"half": true`` config in
fp32 as the original did.


At the end one line on stderr gives prompt tokens/s (prefill) and decode tokens/s apart, and the
peak memory; ``--stats run.json`` also writes them as JSON (atomically; never over an input or the
output)::

    prompt: 640 tokens in 3.10 s (206.5 tokens/s); decode: 1024 tokens in 40.2 s (25.47 tokens/s); ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from cpm_live.checkpoint.base_model import ModelArgs, add_model_args, find_vocab, load_base, vocab_beside
from cpm_live.data.jsonl import answered_records
from cpm_live.errors import CPMLiveError, DataFormatError, OutputError, SampleTooLong, for_cli
from cpm_live.generation.bee import CPMBeeBeamSearch, CPMBeeGeneration, CPMBeeGreedy, CPMBeeSampling
from cpm_live.generation.prompt import build_prompt
from cpm_live.generation.stats import GenerationStats
from cpm_live.models import CPMBee, CPMBeeConfig
from cpm_live.outputs import check_output_file, reported_write
from cpm_live.tokenizers import CPMBeeTokenizer, check_vocab_fits
from cpm_live.utils import atomic_write_text, set_cpu_threads


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        value = float(text)
        if not (low < value if low_open else low <= value) or value > high:
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
        return value
    return parse


def device_name(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (CPM-Bee's default is ``cuda:0``)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate the <ans> of CPM-Bee jsonl records.")
    add_model_args(p, load_required=True, adapter=True)
    p.add_argument("--input", required=True, help="jsonl, one CPM-Bee sample with an <ans> key per line")
    p.add_argument("--output", required=True, help="jsonl to write, the input records with <ans> filled in")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="records decoded together")
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--use-bminf", action="store_true", help="CPM-Bee's BMInf switch: accepted, BMInf is not used")
    p.add_argument("--memory-limit", type=int, default=None, help="CPM-Bee's BMInf memory limit (GB): ignored")
    p.add_argument("--max-length", type=_int_at_least(0), default=100, help="tokens per answer (plus eos)")
    p.add_argument("--max-prompt-length", type=_int_at_least(1), default=None,
                   help="longest prompt in tokens; a longer record stops the run before the model loads "
                        "(default: the config's position_bias_max_distance, 2048 for CPM-Bee)")
    p.add_argument("--repetition-penalty", type=_float_in(1.0, float("inf")), default=1.1,
                   help="divide (multiply) positive (negative) logits of generated tokens; 1 = off")
    p.add_argument("--repetition-window", type=_int_at_least(1), default=None,
                   help="penalize only the last N generated tokens (default: all)")
    strategy = p.add_mutually_exclusive_group()
    strategy.add_argument("--sampling", action="store_true", help="top-k/top-p sampling, not beam search")
    strategy.add_argument("--greedy", action="store_true", help="argmax decoding instead of beam search")
    p.add_argument("--beam-size", type=_int_at_least(1), default=3, help="beam search width")
    p.add_argument("--top-k", type=_int_at_least(0), default=0, help="sampling: keep k best tokens (0: all)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0), default=0.9, help="sampling: nucleus mass (0: off)")
    p.add_argument("--temperature", type=_float_in(0.0, float("inf"), low_open=True), default=0.9,
                   help="sampling: logits are divided by it")
    p.add_argument("--seed", type=int, default=1234, help="sampling: seed of the random stream")
    p.add_argument("--stats", default=None,
                   help="also write prompt/decode tokens per second and peak memory to this JSON file")
    return p


def read_records(path: str) -> list[tuple[str, dict[str, Any]]]:
    """``(file:line, record)`` for every non-blank line; each must be an object with ``"<ans>"``."""
    return list(answered_records(path))


def _check_prompts(tokenizer: CPMBeeTokenizer, records: list[tuple[str, dict[str, Any]]], max_length: int) -> None:
    """Tokenize every record now, so a bad or too long one fails before the (slow) model load; a prompt's
    attention grows with the square of its length, so an unbounded one could ask for terabytes."""
    for location, record in records:
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataFormatError(f"{location}: the record holds a lone surrogate ({e.object[e.start]!r}, a "
                                  f"\\ud800-\\udfff escape without its pair), which is not text: fix the "
                                  f"escape") from None
        try:
            build_prompt(tokenizer, record, max_length)
        except SampleTooLong as e:
            raise DataFormatError(f"{location}: the prompt has at least {e.length} tokens, more than "
                                  f"--max-prompt-length {max_length}: shorten the record or raise the limit") from None
        except ValueError as e:
            raise DataFormatError(f"{location}: {e}") from None


def load_model(model_args: ModelArgs, config: CPMBeeConfig, device: torch.device) -> CPMBee:
    """The base of ``config`` with its weights and adapter, on ``device`` (fp16 runs in fp32 on CPU)."""
    if device.type == "cpu" and config.dtype == torch.float16:
        print("--device cpu: running the fp16 config in fp32", file=sys.stderr)
        config = config.with_dtype(torch.float32)
    return load_base(model_args, config, device=device)


def _generator(args: argparse.Namespace, model: CPMBee, tokenizer: CPMBeeTokenizer):
    """The chosen front end and ``batch -> answered batch`` with the command line's settings."""
    common = {"max_length": args.max_length, "repetition_penalty": args.repetition_penalty,
              "repetition_window": args.repetition_window}
    generator: CPMBeeGeneration
    if args.sampling:
        generator = CPMBeeSampling(model, tokenizer, seed=args.seed)
        return generator, lambda batch: generator.generate(batch, top_k=args.top_k, top_p=args.top_p,
                                                           temperature=args.temperature, **common)
    if args.greedy:
        generator = CPMBeeGreedy(model, tokenizer)
        return generator, lambda batch: generator.generate(batch, **common)
    generator = CPMBeeBeamSearch(model, tokenizer)
    return generator, lambda batch: generator.generate(batch, beam_size=args.beam_size, **common)


def run(args: argparse.Namespace) -> tuple[int, GenerationStats, torch.device]:
    """Generate for every record of ``args.input`` into ``args.output``; returns the record count and
    the run's speed counters (on that device)."""
    model_args = ModelArgs.from_args(args)
    model_args.check_paths()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    records = read_records(args.input)
    config = model_args.resolve_config()
    tokenizer = model_args.tokenizer()
    if tokenizer.vocab_size < config.vocab_size:
        check_vocab_fits(find_vocab(model_args.vocab, model_args.load), config.vocab_size)
    _check_prompts(tokenizer, records, args.max_prompt_length or config.position_bias_max_distance)
    model = load_model(model_args, config, device)
    generator, generate = _generator(args, model, tokenizer)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with reported_write(args.output), open(args.output, "w", encoding="utf-8") as out, \
            tqdm(total=len(records), desc="generate", unit="record") as bar:
        for start in range(0, len(records), args.batch_size):
            batch = [record for _, record in records[start:start + args.batch_size]]
            for record in generate(batch):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
            bar.update(len(batch))
    return len(records), generator.stats, device


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_cpu_threads()
    if args.device and args.device.startswith("cuda"):
        index = torch.device(args.device).index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            parser.error(f"--device {args.device} but torch sees {torch.cuda.device_count()} CUDA device(s); "
                         f"use --device cpu or an existing cuda:N")
    if args.use_bminf or args.memory_limit is not None:
        print("warning: --use-bminf/--memory-limit are accepted for CPM-Bee's scripts but BMInf is not used; the "
              "model runs with plain torch (use an int4 checkpoint to save memory)", file=sys.stderr)
    try:
        # Without --vocab the vocab.txt beside --load is read: an input like the named ones.
        inputs = [args.input, args.load, args.delta, args.vocab or vocab_beside(args.load), args.model_config]
        check_output_file(args.output, inputs, force=args.force)
        if args.stats is not None:
            if os.path.realpath(args.stats) == os.path.realpath(args.output):
                raise OutputError(f"`stats` {args.stats} is also `output`; write the stats to another file")
            check_output_file(args.stats, [*inputs, args.output], force=args.force, setting="stats")
        count, stats, device = run(args)
    except CPMLiveError as e:
        raise SystemExit(f"error: {for_cli(e, parser)}") from None
    print(f"wrote {count} records to {args.output}", file=sys.stderr)
    print(stats.summary_line(device), file=sys.stderr)
    if args.stats is not None:
        report = {"records": count, **stats.report(device)}
        try:
            with reported_write(args.stats):
                atomic_write_text(args.stats, json.dumps(report, indent=1) + "\n")
        except CPMLiveError as e:
            raise SystemExit(f"error: {for_cli(e, parser)}") from None
    return 0

