"""Does a quantized base cost quality? Held-out perplexity and LoRA fine-tunes on every base format.

    python benchmarks/quality.py --out benchmarks/results-quality.json   # CCPM + the real vocab when ../shared is there
    python benchmarks/quality.py --quick --out /tmp/quality.json          # the demo data, a tiny vocab: about a minute
    # on a shared machine, in sessions: the base first (SIGTERM ends a session, the next call resumes),
    # then a few formats per call in one work dir; the call that finds every job done writes the results
    python benchmarks/quality.py --out r.json --build-only --build-threads 2
    python benchmarks/quality.py --out r.json --workdir /tmp/q --formats fp32,int8
    python benchmarks/quality.py --out r.json --workdir /tmp/q

The QLoRA paper's two checks, on a CPM-Bee that has learned something (a random one has not: its logits
sit at ln(vocab), see ``cpm_live/demo/format_base.py``):

1. A base pretrained on real text with the training CLI (``train_base``), cached under ``--cache-dir``
   keyed by its settings and data, so it is built once; a build stopped by SIGTERM continues on the
   next call.
2. That base in every format the project loads: fp32, its weights rounded to bf16, LLM.int8, FP4, NF4
   and NF4 + double quantization (``cpm-bee-export`` / ``cpm-bee-quantize``). Every format computes
   in fp32 (``int4_compute_dtype: float32``), so only the stored weights differ; int8 runs
   bitsandbytes' LLM.int8 matmul as it always does.
3. Per format: the held-out loss of the base (perplexity = exp(loss)), its loss and accuracy on the
   fine-tuning task before any fine-tuning, and the same LoRA fine-tune (same data, steps and seeds:
   a seed sets the adapter's init and the order of the training records) scored on a held-out set with
   ``cpm-bee-generate`` + ``cpm-bee-evaluate`` (exact match) and by its eval loss every few steps.
   Plus the checkpoint's bytes and the fine-tuning process's peak RSS.

Losses come from the training loop itself: a loss "before fine-tuning" is the eval loss of a one-step
run whose only update has learning rate 0 (the warmup's first step), which the run's log confirms.
Each (format, seed) job runs in a fresh process (``bench_common.run_isolated``), ``--workers`` at once.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bench_common as bc

from cpm_live.utils import atomic_write_text

REPO = bc.REPO_ROOT
SHARED = REPO.parent / "shared" / "cpm-bee"
DEFAULT_CACHE = Path.home() / ".cache" / "cpm_live" / "quality-base"
REFERENCE = "fp32"
MATCH_QUESTION = "末尾这句诗写的是前面这段话的意境吗？"  # "does the closing poem line depict the passage before it?"

# name -> how the checkpoint is made from the fp32 base, and the config keys that load it.
FORMATS: dict[str, dict[str, Any]] = {
    "fp32": {"export": "fp32", "config": {}},
    "bf16": {"export": "bf16", "config": {}},  # bf16-rounded weights, read into the fp32 model
    "int8": {"quantize": ["--int8"], "config": {"int8": True}},
    "fp4": {"quantize": ["--quant-type", "fp4", "--no-double-quant"],
            "config": {"int4": True, "int4_quant_type": "fp4", "int4_double_quant": False}},
    "nf4": {"quantize": ["--quant-type", "nf4", "--no-double-quant"],
            "config": {"int4": True, "int4_quant_type": "nf4", "int4_double_quant": False}},
    "nf4_dq": {"quantize": ["--quant-type", "nf4"],
               "config": {"int4": True, "int4_quant_type": "nf4", "int4_double_quant": True}},
}
NOT_PROJECTIONS = ("input_embedding.", "position_bias.")  # and every layernorm: stored as they are in all formats

PLANS: dict[str, dict[str, Any]] = {
    "quick": {
        "model": {"dim_model": 64, "num_heads": 2, "dim_head": 32, "dim_ff": 128, "num_layers": 2},
        "base": {"steps": 150, "lr": 1e-2, "batch_size": 8, "max_length": 64, "warmup": 10, "decay": "constant",
                 "eval_interval": 50, "save_iters": 0, "seed": 0},
        "heldout_records": 100, "task_eval_records": 64,
        "finetune": {"steps": 12, "eval_interval": 4, "lr": 3e-3, "batch_size": 8, "max_length": 64,
                     "lora_r": 8, "lora_alpha": 16, "warmup": 2},
        "generate": {"max_length": 4, "batch_size": 16},
        # One process per format: at this size a process's start costs more than its fine-tunes.
        "seeds": [1, 2, 3], "seeds_per_job": 3, "finetuned": ["fp32", "int8", "fp4", "nf4", "nf4_dq"],
    },
    "full": {
        # d = 512 and 8 layers at CPM-Bee-10B's proportions (dim_ff = 2.5 d, heads of 64).
        "model": {"dim_model": 512, "num_heads": 8, "dim_head": 64, "dim_ff": 1280, "num_layers": 8},
        "base": {"steps": 480, "lr": 1e-2, "batch_size": 2, "max_length": 256, "warmup": 20, "decay": "cosine",
                 "eval_interval": 120, "save_iters": 40, "seed": 0},
        "heldout_records": 384, "task_eval_records": 96,
        "finetune": {"steps": 50, "eval_interval": 10, "lr": 3e-3, "batch_size": 2, "max_length": 256,
                     "lora_r": 16, "lora_alpha": 32, "warmup": 4},
        "generate": {"max_length": 2, "batch_size": 16},
        "seeds": [1, 2, 3], "seeds_per_job": 1, "finetuned": ["fp32", "int8", "fp4", "nf4", "nf4_dq"],
    },
}
LORA_TARGETS = "project_q,project_k,project_v,attention_out,w_0,w_1,w_out"  # every projection, as QLoRA does
T_95_TWO_SIDED = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}  # Student's t, by degrees of freedom


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] quality: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data

def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> str:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _ccpm_reformat() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The tutorial's raw CCPM -> CPM-Bee converter (``tutorials/basic_task_finetune/data_reformat.py``)."""
    path = REPO / "tutorials" / "basic_task_finetune" / "data_reformat.py"
    spec = importlib.util.spec_from_file_location("data_reformat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reformat_record


def match_records(records: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """One yes/no example per CCPM record: its translation followed by its own line (every even
    record, 是) or by the line of another record drawn with ``seed`` (否), as one text: the way the
    base read translation and line in pretraining.

    The answers are common characters whose embedding rows the text base has trained; CCPM's own
    ``<option_k>`` labels never occur in its text, so under LoRA their frozen rows would stay at
    their init (see ``cpm_live/demo/format_base.py``) and the answer could not be learned."""
    rng = random.Random(seed)
    lines = [r["options"][r["<ans>"]] for r in records]
    out = []
    for i, record in enumerate(records):
        line, answer = lines[i], "是"
        while i % 2 and line == lines[i]:
            line, answer = rng.choice(lines), "否"
        out.append({"input": record["input"] + line, "question": MATCH_QUESTION, "<ans>": answer})
    return out


def ccpm_available() -> bool:
    return (SHARED / "vocab" / "bee.txt").is_file() and (SHARED / "ccpm" / "raw_data" / "train.jsonl").is_file()


def prepare_data(kind: str, plan: dict[str, Any], work: Path) -> dict[str, Any]:
    """Files of one data set: ``vocab``, ``base_train`` / ``heldout`` (the base's text, plain
    ``{"<ans>": text}`` records for CCPM), ``task_train`` / ``task_eval`` (the fine-tuning task)."""
    work.mkdir(parents=True, exist_ok=True)
    if kind == "ccpm":
        # Text: each CCPM translation followed by its poem line, a "document" of real Chinese.
        # Base: the train split's documents; held out: the eval split's. Task: CCPM itself.
        reformat = _ccpm_reformat()
        splits = {split: [reformat(r) for r in _read_jsonl(SHARED / "ccpm" / "raw_data" / f"{split}.jsonl")]
                  for split in ("train", "eval")}
        docs = {split: [{"<ans>": r["input"] + r["options"][r["<ans>"]]} for r in records]
                for split, records in splits.items()}
        random.Random(0).shuffle(docs["train"])
        return {"kind": "ccpm", "source": str(SHARED), "vocab": str(SHARED / "vocab" / "bee.txt"),
                "task": "does the classical poem line closing a modern translation depict it? (CCPM pairs; "
                        "half the lines belong to another translation; answer 是 / 否)",
                "base_train": _write_jsonl(work / "base_train.jsonl", docs["train"]),
                "heldout": _write_jsonl(work / "heldout.jsonl", docs["eval"][:plan["heldout_records"]]),
                "task_train": _write_jsonl(work / "task_train.jsonl", match_records(splits["train"], seed=0)),
                "task_eval": _write_jsonl(work / "task_eval.jsonl",
                                          match_records(splits["eval"], seed=1)[:plan["task_eval_records"]])}
    from cpm_live.demo import DEMO_WORDS, demo_data_file
    from cpm_live.tokenizers.bee import build_tiny_vocab

    base = _read_jsonl(demo_data_file("base_train.jsonl"))
    held = plan["heldout_records"]
    return {"kind": "demo", "source": "cpm_live/demo_data (shipped with the package)",
            "vocab": build_tiny_vocab(work / "vocab.txt", list(DEMO_WORDS) + [" " + w for w in DEMO_WORDS]),
            "task": "count the animals among four words (the demo's new task)",
            "base_train": _write_jsonl(work / "base_train.jsonl", base[:-held]),
            "heldout": _write_jsonl(work / "heldout.jsonl", base[-held:]),
            "task_train": _write_jsonl(work / "task_train.jsonl", _read_jsonl(demo_data_file("train.jsonl"))),
            "task_eval": _write_jsonl(work / "task_eval.jsonl",
                                      _read_jsonl(demo_data_file("eval.jsonl"))[:plan["task_eval_records"]])}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the base

def base_config(plan: dict[str, Any], vocab: str) -> dict[str, Any]:
    from cpm_live.models import CPMBeeConfig
    from cpm_live.tokenizers import CPMBeeTokenizer

    return CPMBeeConfig(vocab_size=CPMBeeTokenizer(vocab).vocab_size, half=False, **plan["model"]).to_dict()


def ensure_base(plan: dict[str, Any], data: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """The pretrained fp32 base for ``plan`` and ``data``: from the cache, or built (and cached) now.

    The cache key hashes the model config, the build settings and the bytes of the vocab and of the
    text, so a changed setting or file builds a new base. Every build session's seconds are logged in
    ``sessions.jsonl`` (a SIGTERM stops a session after saving; the next call resumes)."""
    from cpm_live.demo.format_base import train_base
    from cpm_live.training.metrics import read_metrics

    config = base_config(plan, data["vocab"])
    settings = {"model": config, "build": plan["base"],
                "data": {name: _sha256(data[name]) for name in ("vocab", "base_train", "heldout")}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_dir / key
    summary_file = out / "build.json"
    if summary_file.is_file() and (out / "base.pt").is_file():
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        log(f"base from the cache: {out} (built in {summary['build_seconds']:.0f} s)")
        return {**summary, "cached": True}
    out.mkdir(parents=True, exist_ok=True)
    # The run reads its own copies, so that resuming sees the same files whatever the work dir.
    for name in ("base_train", "heldout"):
        shutil.copyfile(data[name], out / f"{name}.jsonl")
    config_file = out / "config.json"
    atomic_write_text(config_file, json.dumps(config, indent=1) + "\n")
    b = plan["base"]
    log(f"building the base in {out}: {b['steps']} steps (resumable: stop with SIGTERM, rerun to continue)")
    started = time.perf_counter()
    try:
        train_base(str(config_file), data["vocab"], str(out / "base_train.jsonl"), str(out), b["steps"], lr=b["lr"],
                   batch_size=b["batch_size"], max_length=b["max_length"], warmup=b["warmup"], seed=b["seed"],
                   log_interval=10, decay=b["decay"], heldout=str(out / "heldout.jsonl"),
                   eval_interval=b["eval_interval"], save_iters=b["save_iters"])
    finally:
        with open(out / "sessions.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "seconds": round(time.perf_counter() - started, 1), "threads": _torch_threads(),
                                "load_average_1m": os.getloadavg()[0]}) + "\n")
    records = read_metrics(str(out / "train" / "metrics.jsonl"))
    train_losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    heldout = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    sessions = _read_jsonl(out / "sessions.jsonl")
    summary = {"path": str(out / "base.pt"), "config": str(config_file), "key": key, "settings": settings,
               "command": "cpm_live.demo.format_base.train_base -> cpm-bee-finetune (full fine-tune from random "
                          "weights)",
               "build_seconds": round(sum(s["seconds"] for s in sessions), 1), "sessions": sessions,
               "train_loss_first": train_losses[0][1],
               "train_loss_last": train_losses[-1][1], "heldout_loss_curve": heldout,
               "chance_loss": math.log(config["vocab_size"]), "environment": bc.environment("cpu", _torch_threads())}
    atomic_write_text(summary_file, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return {**summary, "cached": False}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------- formats

def make_formats(base: dict[str, Any], names: Sequence[str], work: Path) -> dict[str, dict[str, Any]]:
    """Checkpoint and config of each format, made from the fp32 base with the project's CLIs."""
    from cpm_live.convert.cli import main as quantize_main
    from cpm_live.convert.export import main as export_main

    config = json.loads(Path(base["config"]).read_text(encoding="utf-8"))
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        spec = FORMATS[name]
        checkpoint = work / f"base-{name}.safetensors"
        if not checkpoint.is_file():  # else an earlier session of this run made it (the CLIs write atomically)
            if "export" in spec:
                export_main(["--model-config", base["config"], "--load", base["path"], "--output", str(checkpoint),
                             "--dtype", spec["export"]])
            else:
                quantize_main(["--input-path", base["path"], "--output-path", str(checkpoint), "--workers", "1",
                               *spec["quantize"]])
        config_file = work / f"config-{name}.json"
        atomic_write_text(config_file, json.dumps({**config, "int4_compute_dtype": "float32", **spec["config"]},
                                                  indent=1) + "\n")
        out[name] = {"checkpoint": str(checkpoint), "config": str(config_file), **checkpoint_bytes(checkpoint)}
    return out


def checkpoint_bytes(path: Path) -> dict[str, int]:
    """Bytes of the file, and of its projection tensors (what the format changes; the embedding,
    position bias and norms are stored alike in every format)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    projections = sum(end - start for key, entry in header.items() if key != "__metadata__"
                      and not key.startswith(NOT_PROJECTIONS) and "layernorm" not in key
                      for start, end in [entry["data_offsets"]])
    return {"file_bytes": os.path.getsize(path), "projection_bytes": projections}


# ---------------------------------------------------------------- jobs (each in a fresh process)

def _finetune_args(job: dict[str, Any], save: str, dataset: str, eval_dataset: str, steps: int, lr: float,
                   warmup: int, eval_interval: int, seed: int) -> list[str]:
    f = job["finetune"]
    return ["--model-config", job["config"], "--load", job["checkpoint"], "--vocab", job["vocab"], "--use-delta",
            "--lora-r", str(f["lora_r"]), "--lora-alpha", str(f["lora_alpha"]), "--lora-targets", LORA_TARGETS,
            "--dataset", dataset, "--eval_dataset", eval_dataset, "--eval-interval", str(eval_interval),
            "--early-stop-patience", str(steps + 1), "--save", save, "--save-name", "lora",
            "--train-iters", str(steps), "--stop-at-train-iters", "--epoch", "1000", "--lr", str(lr),
            "--lr-decay-style", "constant", "--warmup-iters", str(warmup), "--weight-decay", "0.0",
            "--batch-size", str(f["batch_size"]), "--max-length", str(f["max_length"]), "--seed", str(seed),
            "--engine", "torch", "--device", "cpu", "--inspect-iters", "0", "--no-activation-checkpointing",
            "--log-interval", "1"]


def _loss_before_training(job: dict[str, Any], eval_dataset: str, name: str) -> float:
    """The eval loss of the base (+ a LoRA adapter that adds zero) on ``eval_dataset``: a one-step
    run whose update has learning rate 0, evaluated after that step."""
    from cpm_live.training.cli import main as finetune_main
    from cpm_live.training.metrics import read_metrics

    save = os.path.join(job["dir"], name)
    shutil.rmtree(save, ignore_errors=True)
    finetune_main(_finetune_args(job, save, job["one_record"], eval_dataset, steps=1, lr=1e-3, warmup=1,
                                 eval_interval=1, seed=0))
    records = read_metrics(os.path.join(save, "metrics.jsonl"))
    lrs = [r["lr"] for r in records if "lr" in r]
    if lrs != [0.0]:
        raise RuntimeError(f"{save}: expected one step at learning rate 0 before the eval, got {lrs}")
    return next(r["eval_loss"] for r in records if "eval_loss" in r)


def _accuracy(job: dict[str, Any], name: str, delta: str | None) -> float:
    """``cpm-bee-generate`` (greedy) on the task's eval set, scored by ``cpm-bee-evaluate``."""
    from cpm_live.evaluation import main as evaluate_main
    from cpm_live.generation.cli import main as generate_main

    g = job["generate"]
    predictions, scores = (os.path.join(job["dir"], f"{name}-{kind}") for kind in ("predictions.jsonl", "scores.json"))
    generate_main(["--model-config", job["config"], "--load", job["checkpoint"], "--vocab", job["vocab"],
                   "--input", job["task_eval"], "--output", predictions, "--greedy", "--repetition-penalty", "1.0",
                   "--max-length", str(g["max_length"]), "--batch-size", str(g["batch_size"]), "--device", "cpu"]
                  + (["--delta", delta] if delta else []))
    evaluate_main(["--pred", predictions, "--ref", job["task_eval"], "--metrics", "accuracy", "--output", scores])
    with open(scores, encoding="utf-8") as f:
        return json.load(f)["accuracy"]


def job_format(job: dict[str, Any]) -> dict[str, Any]:
    """One format's work in one process: the fine-tunes of ``job["seeds"]`` first (so the first one's
    peak RSS is its own), then, with ``job["base_evals"]``, the base's held-out loss and, for a
    fine-tuned format, its task loss and accuracy before fine-tuning."""
    from cpm_live.training.cli import main as finetune_main
    from cpm_live.training.metrics import read_metrics

    os.makedirs(job["dir"], exist_ok=True)
    rss_at_start = bc.rss_bytes()[0] / bc.MIB
    result: dict[str, Any] = {"format": job["format"], "rss_at_start_mib": rss_at_start, "runs": {}}
    f = job["finetune"]
    for seed in job["seeds"]:
        save = os.path.join(job["dir"], f"seed{seed}")
        shutil.rmtree(save, ignore_errors=True)
        started = time.perf_counter()
        finetune_main(_finetune_args(job, save, job["task_train_by_seed"][str(seed)], job["task_eval"], f["steps"],
                                     f["lr"], f["warmup"], f["eval_interval"], seed))
        seconds = time.perf_counter() - started
        records = read_metrics(os.path.join(save, "metrics.jsonl"))
        result["runs"][str(seed)] = {
            "eval_loss": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r],
            "train_loss": [r["loss"] for r in records if "loss" in r],
            "peak_rss_mib": max(r["peak_memory_mb"] for r in records if "peak_memory_mb" in r),
            "seconds": seconds,
            "accuracy": _accuracy(job, f"seed{seed}", os.path.join(save, "lora-delta-last")),
        }
    if job["base_evals"]:
        result["heldout_loss"] = _loss_before_training(job, job["heldout"], "heldout")
        if job["finetuned"]:
            result["task_loss_before"] = _loss_before_training(job, job["task_eval"], "task-before")
            result["accuracy_before"] = _accuracy(job, "base", None)
    return result


# ---------------------------------------------------------------- summary

def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def paired(values: dict[str, float], reference: dict[str, float]) -> dict[str, Any]:
    """Per-seed differences from the reference (same seed: same adapter init and record order):
    mean, spread, Student's t and whether |t| clears the two-sided 95% threshold."""
    diffs = [values[s] - reference[s] for s in reference]
    out = _stats(diffs)
    n = len(diffs)
    if n < 2:
        return out
    if out["std"] == 0.0:
        out.update(t=0.0 if out["mean"] == 0.0 else math.inf)
    else:
        out.update(t=out["mean"] / (out["std"] / math.sqrt(n)))
    out["differs_at_95"] = abs(out["t"]) > T_95_TWO_SIDED.get(n - 1, 1.96)
    return out


def answer_counts(paths: Sequence[Path], top: int = 3) -> dict[str, int]:
    """The most common generated answers in ``cpm-bee-generate`` outputs: what a model says when
    its accuracy is low."""
    counts = Counter(r["<ans>"] for path in paths for r in _read_jsonl(path))
    return dict(counts.most_common(top))


def summarize(jobs: list[dict[str, Any]], formats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row per format: perplexity, bytes, and mean/spread over seeds of the fine-tunes (each
    job's result carries the ``dir`` that holds its predictions)."""
    rows: dict[str, dict[str, Any]] = {}
    for job in jobs:
        row = rows.setdefault(job["format"], {"runs": {}, "dir": job["dir"]})
        row["runs"].update(job["runs"])
        for key in ("heldout_loss", "task_loss_before", "accuracy_before"):
            if key in job:
                row[key] = job[key]
        if job["runs"]:  # a job's first fine-tune ran in a fresh process: its peak is its own
            row.setdefault("peak_rss_mib_per_job", []).append(next(iter(job["runs"].values()))["peak_rss_mib"])
            row["rss_at_start_mib"] = job["rss_at_start_mib"]
    for name, row in rows.items():
        row.update(file_bytes=formats[name]["file_bytes"], projection_bytes=formats[name]["projection_bytes"],
                   perplexity=math.exp(row["heldout_loss"]))
        runs = row["runs"]
        if runs:
            row["peak_rss_mib"] = max(row["peak_rss_mib_per_job"])
            row["accuracy"] = _stats([r["accuracy"] for r in runs.values()])
            row["final_eval_loss"] = _stats([r["eval_loss"][-1][1] for r in runs.values()])
            row["eval_loss_lowered"] = all(r["eval_loss"][-1][1] < row["task_loss_before"] for r in runs.values())
            row["answers_before"] = answer_counts([Path(row["dir"]) / "base-predictions.jsonl"])
            row["answers_after"] = answer_counts([Path(row["dir"]) / f"seed{s}-predictions.jsonl" for s in runs])
    reference = rows[REFERENCE]
    for name, row in rows.items():
        row["perplexity_over_reference"] = row["perplexity"] / reference["perplexity"]
        if row["runs"] and name != REFERENCE:
            row["paired_vs_reference"] = {
                metric: paired({s: pick(r) for s, r in row["runs"].items()},
                               {s: pick(r) for s, r in reference["runs"].items()})
                for metric, pick in (("accuracy", lambda r: r["accuracy"]),
                                     ("final_eval_loss", lambda r: r["eval_loss"][-1][1]))}
    return rows


def tables(rows: dict[str, dict[str, Any]]) -> str:
    """docs/quality.md's two Markdown tables: each base, then the fine-tunes on it."""
    base = ["| base | checkpoint MiB (projections) | held-out loss | perplexity | / fp32 |", "|---|---|---|---|---|"]
    tunes = ["| base | task loss before | accuracy before | eval loss after | Δ vs fp32, paired (t) | "
             "accuracy after | Δ vs fp32, paired (t) | answers after (all seeds) | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        base.append(f"| {name} | {row['file_bytes'] / 2**20:.2f} ({row['projection_bytes'] / 2**20:.2f}) | "
                    f"{row['heldout_loss']:.4f} | {row['perplexity']:.2f} | {row['perplexity_over_reference']:.4f} |")
        if not row["runs"]:
            continue
        cells = [name, f"{row['task_loss_before']:.3f}", f"{row['accuracy_before']:.3f}"]
        for metric, digits in (("final_eval_loss", 4), ("accuracy", 3)):
            stats, delta = row[metric], row.get("paired_vs_reference", {}).get(metric)
            cells.append(f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}")
            cells.append("—" if delta is None else f"{delta['mean']:+.{digits}f} ± {delta['std']:.{digits}f} "
                                                   f"({delta['t']:.2f})")
        cells.append(", ".join(f"{answer or '(empty)'} ×{n}" for answer, n in row["answers_after"].items()))
        cells.append(f"{row['peak_rss_mib']:.0f}")
        tunes.append("| " + " | ".join(cells) + " |")
    return "\n".join(base) + "\n\n" + "\n".join(tunes)


def write_plot(rows: dict[str, dict[str, Any]], path: str, title: str) -> str:
    """Eval loss against the step for each fine-tuned base: the mean over seeds, the band from the
    lowest to the highest seed; step 0 is the base before fine-tuning (as ``cpm-bee-plot`` draws)."""
    from matplotlib.figure import Figure

    from cpm_live.utils import atomic_path

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    for i, (name, row) in enumerate((n, r) for n, r in rows.items() if r["runs"]):
        curves = [dict(r["eval_loss"]) for r in row["runs"].values()]
        steps = [0] + sorted(curves[0])
        values = [[row["task_loss_before"]] * len(curves)] + [[c[s] for c in curves] for s in steps[1:]]
        ax.plot(steps, [statistics.fmean(v) for v in values], "o-", color=f"C{i}", markersize=3, label=name)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=f"C{i}", alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (cross-entropy per answer token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ---------------------------------------------------------------- driver

def _job_file(job: dict[str, Any]) -> Path:
    """Where a job's result is kept: named by a hash of everything the job is given (base included)."""
    key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:12]
    return Path(job["dir"]) / f"result-seeds{'-'.join(map(str, job['seeds'])) or 'none'}-{key}.json"


def run_quality(plan: dict[str, Any], data: dict[str, Any], base: dict[str, Any], work: Path, workers: int,
                threads: int, only: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Formats, jobs and summary for a built base; None while jobs are left.

    Each job's result is kept in ``work``, so a run can be split into sessions that each run the
    jobs of the formats in ``only`` (default: all left); the summary is made once every job has its
    result. Each session's seconds are logged in ``work/sessions.jsonl``."""
    started = time.perf_counter()
    names = [n for n in FORMATS if n in plan["finetuned"] or n == "bf16"]
    formats = make_formats(base, names, work / "formats" / base["key"])
    task_train = _read_jsonl(data["task_train"])
    by_seed = {}
    for seed in plan["seeds"]:  # the seed also orders the training records
        records = list(task_train)
        random.Random(seed).shuffle(records)
        by_seed[str(seed)] = _write_jsonl(work / "data" / f"task_train-seed{seed}.jsonl", records)
    one_record = _write_jsonl(work / "data" / "one_record.jsonl", task_train[:1])
    common = {"base": base["key"], "vocab": data["vocab"], "heldout": data["heldout"], "task_eval": data["task_eval"],
              "task_train_by_seed": by_seed, "one_record": one_record, "finetune": plan["finetune"],
              "generate": plan["generate"], "threads": threads}
    jobs = []
    for name in names:
        seeds = plan["seeds"] if name in plan["finetuned"] else []
        per_job = plan["seeds_per_job"]
        groups = [seeds[i:i + per_job] for i in range(0, len(seeds), per_job)]
        for i, group in enumerate(groups or [[]]):
            jobs.append({**common, **formats[name], "format": name, "seeds": group, "base_evals": i == 0,
                         "finetuned": bool(seeds), "dir": str(work / "runs" / name)})
    todo = [job for job in jobs if not _job_file(job).is_file() and (only is None or job["format"] in only)]
    log(f"{len(todo)} of {len(jobs)} jobs now, on {workers} worker(s), {threads} thread(s) each")

    def run(job: dict[str, Any]) -> None:
        job_started = time.perf_counter()
        result = bc.run_isolated(job_format, job)
        result["job_seconds"] = time.perf_counter() - job_started
        atomic_write_text(_job_file(job), json.dumps(result, indent=1) + "\n")
        log(f"{job['format']} seeds {job['seeds']} done in {result['job_seconds']:.0f} s")

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, todo))
    finally:
        with open(work / "sessions.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": len(todo),
                                "seconds": round(time.perf_counter() - started, 1),
                                "load_average_1m": os.getloadavg()[0]}) + "\n")
    left = [job for job in jobs if not _job_file(job).is_file()]
    if left:
        log(f"{len(left)} jobs left ({', '.join(sorted({j['format'] for j in left}))}): rerun with the same "
            f"--workdir {work} to continue")
        return None
    results = [{**json.loads(_job_file(job).read_text(encoding="utf-8")), "dir": job["dir"]} for job in jobs]
    rows = summarize(results, formats)
    sessions = _read_jsonl(work / "sessions.jsonl")
    return {"data": data, "base": base, "formats": formats, "rows": rows, "tables": tables(rows),
            "job_seconds": {f"{r['format']} {' '.join(r['runs']) or 'base'}": r["job_seconds"] for r in results},
            "sessions": sessions, "seconds": sum(s["seconds"] for s in sessions)}


def default_data(quick: bool) -> str:
    return "ccpm" if ccpm_available() and not quick else "demo"


def run_section(quick: bool, workdir: str, threads: int) -> dict[str, Any]:
    """``benchmarks/run.py``'s section: the default data, base cache and one job per core."""
    plan = PLANS["quick" if quick else "full"]
    work = Path(workdir)
    data = prepare_data(default_data(quick), plan, work / "data")
    base = ensure_base(plan, data, DEFAULT_CACHE)
    return {"plan": plan, **run_quality(plan, data, base, work, len(os.sched_getaffinity(0)), threads)}


def headline(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per format: perplexity (and over fp32's), mean accuracy and final eval loss over seeds."""
    out = {}
    for name, row in rows.items():
        out[name] = {"perplexity": row["perplexity"], "perplexity_over_fp32": row["perplexity_over_reference"]}
        if row["runs"]:
            out[name].update(accuracy_mean=row["accuracy"]["mean"], accuracy_std=row["accuracy"]["std"],
                             final_eval_loss_mean=row["final_eval_loss"]["mean"])
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON; the plot goes beside it (.png)")
    p.add_argument("--quick", action="store_true", help="tiny model on the demo data (about a minute)")
    p.add_argument("--data", choices=("auto", "ccpm", "demo"), default="auto",
                   help="ccpm: real vocab + CCPM from ../shared/cpm-bee; demo: the package's demo data and a tiny "
                        "vocab; auto (default): ccpm when present and not --quick")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help=f"where built bases are kept (default {DEFAULT_CACHE})")
    p.add_argument("--build-only", action="store_true",
                   help="build (or find) the base and stop; a long build can be split into sessions this way")
    p.add_argument("--workdir", default=None, help="keep checkpoints, adapters and predictions here (default: a "
                                                   "temporary directory, removed at the end)")
    p.add_argument("--formats", default=None,
                   help="comma-separated formats whose jobs run in this session (default: all left); with "
                        "--workdir a long run is split into sessions, and the last one writes the results")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="jobs at once (default: cores)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    p.add_argument("--build-threads", type=int, default=1,
                   help="torch threads while building the base (default 1; on a machine of your own: its cores)")
    args = p.parse_args(argv)
    if args.data == "auto":
        args.data = default_data(args.quick)
    if args.data == "ccpm" and not ccpm_available():
        p.error(f"--data ccpm needs {SHARED}/vocab/bee.txt and {SHARED}/ccpm/raw_data/; use --data demo")
    if args.formats is not None:
        args.formats = args.formats.split(",")
        unknown = sorted(set(args.formats) - set(FORMATS))
        if unknown:
            p.error(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
        if args.workdir is None:
            p.error("--formats splits a run into sessions, which share --workdir: give one")
    for name in ("workers", "threads", "build_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    from cpm_live.demo.format_base import BuildInterrupted

    args = parse_args(argv)
    bc.quiet()
    plan = PLANS["quick" if args.quick else "full"]
    meta = {"command": " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": bc.environment("cpu", args.threads),
            "plan": plan, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="cpm-live-quality-") as tmp:
        work = Path(args.workdir or tmp)
        data = prepare_data(args.data, plan, work / "data")
        torch.set_num_threads(args.build_threads)
        try:
            base = ensure_base(plan, data, Path(args.cache_dir))
        except BuildInterrupted as e:
            raise SystemExit(f"error: {e}") from None
        if args.build_only:
            print(json.dumps({k: base[k] for k in ("path", "build_seconds", "heldout_loss_curve")}))
            return {"base": base}
        torch.set_num_threads(args.threads)
        results = run_quality(plan, data, base, work, args.workers, args.threads, args.formats)
    if results is None:
        return {}
    results = {"meta": {**meta, "runtime_s": results["seconds"]}, **results}
    atomic_write_text(args.out, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    png = os.path.splitext(args.out)[0] + ".png"
    write_plot(results["rows"], png, f"LoRA on each base ({results['data']['kind']}): mean, min-max over seeds")
    print(results["tables"])
    log(f"wrote {args.out} and {png} in {results['meta']['runtime_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
