"""The end-to-end QLoRA demo on CPU, through the same entry points a user runs.

1. write a small vocabulary and a tiny CPM-Bee config;
2. give the tiny model something to start from: a full fine-tune from random weights on adding digits,
   repeating a word and telling whether a word is an animal (``demo_data/base_train.jsonl``), saved
   as an fp32 checkpoint in the original CPM-Bee key layout (a stand-in for a released model;
   :func:`cpm_live.demo.format_base.train_base`, which also builds one for any vocab and data);
3. compress it to NF4 with ``quantize_state_dict``;
4. score the 4-bit base alone on a task it has never seen (how many of four words are animals);
5. QLoRA-fine-tune the 4-bit base on that task; the adapter is saved in peft's format;
6. score the 4-bit base + adapter on the same eval set, plot the loss curve, and write
   ``summary.json`` with both scores.

Generation is ``cpm-bee-generate`` (beam search), scoring is ``cpm-bee-evaluate`` (exact match,
ROUGE, BLEU) and the plot is ``cpm-bee-plot``, each called with the arguments a user would type.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from cpm_live.demo.format_base import train_base
from cpm_live.models import CPMBeeConfig
from cpm_live.tokenizers import CPMBeeTokenizer
from cpm_live.tokenizers.bee import build_tiny_vocab
from cpm_live.training.metrics import read_metrics
from cpm_live.utils import atomic_write_text, set_cpu_threads

DEMO_WORDS = ("cat dog horse bird fish cow sheep lion tiger bear wolf fox duck goat frog mouse red blue green "
              "apple bread table chair stone river cloud paper glass spoon door window book lamp road sand "
              "milk rice cup box hat Pick animal Which What sum word yes no").split()
TASK = "count the animals among four words (new to the base)"
EXAMPLES = 3


def demo_data_file(name: str) -> str:
    return str(resources.files("cpm_live") / "demo_data" / name)


def tiny_config(vocab_size: int) -> CPMBeeConfig:
    return CPMBeeConfig(vocab_size=vocab_size, dim_model=128, num_heads=4, dim_head=32, dim_ff=256,
                        num_layers=3, half=False)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _mean_loss(records: list[dict[str, Any]], first: bool, n: int = 3) -> float:
    """Mean train loss of the first (or last) ``n`` logged steps."""
    losses = [r["loss"] for r in records if "loss" in r]
    part = losses[:n] if first else losses[-n:]
    return sum(part) / len(part)


def _generate_and_score(out: str, name: str, int4_config: str, int4_ckpt: str, vocab: str,
                        delta: str | None) -> tuple[dict[str, float], str]:
    """``cpm-bee-generate`` then ``cpm-bee-evaluate`` on the eval set; returns (scores, predictions file)."""
    from cpm_live.evaluation import main as evaluate_main
    from cpm_live.generation.cli import main as generate_main

    eval_file = demo_data_file("eval.jsonl")
    predictions = os.path.join(out, f"predictions-{name}.jsonl")
    generate_main(["--model-config", int4_config, "--load", int4_ckpt, "--vocab", vocab, "--input", eval_file,
                   "--output", predictions, "--force", "--beam-size", "3", "--max-length", "8", "--batch-size", "16",
                   "--device", "cpu"] + (["--delta", delta] if delta else []))
    scores_file = os.path.join(out, f"scores-{name}.json")
    evaluate_main(["--pred", predictions, "--ref", eval_file, "--metrics", "accuracy,rouge,bleu",
                   "--output", scores_file, "--force"])
    with open(scores_file, encoding="utf-8") as f:
        return json.load(f), predictions


def _eval_records() -> list[dict[str, Any]]:
    with open(demo_data_file("eval.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _examples(predictions: dict[str, str], n: int) -> list[dict[str, Any]]:
    """The first ``n`` eval records with the reference and each model's answer."""
    from cpm_live.evaluation import read_answers

    refs = _eval_records()
    answers = {name: read_answers(path) for name, path in predictions.items()}
    return [{"input": ref["input"], "reference": ref["<ans>"], **{name: answers[name][i] for name in answers}}
            for i, ref in enumerate(refs[:n])]


def format_report(summary: dict[str, Any]) -> str:
    """The demo's last screen: before/after scores, loss, example answers, where the files are."""
    metrics = list(summary["qlora"])
    lines = [f"task: {summary['task']}; {summary['eval_records']} eval records, exact match",
             "", f"{'':<22}" + "".join(f"{m:>10}" for m in metrics)]
    for name, label in (("base", "4-bit base alone"), ("qlora", "4-bit base + QLoRA")):
        lines.append(f"{label:<22}" + "".join(f"{summary[name][m]:>10.2f}" for m in metrics))
    lines += ["", f"QLoRA train loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f} "
                  f"in {summary['qlora_steps']} steps; curve: {summary['loss_plot']}", "",
              f"{'input':<26}{'reference':<11}{'base':<11}QLoRA"]
    for ex in summary["examples"]:
        lines.append(f"{ex['input']:<26}{ex['reference']:<11}{json.dumps(ex['base']):<11}{json.dumps(ex['qlora'])}")
    lines += ["", f"adapter: {summary['adapter']}", f"pipeline: {summary['seconds']:.0f} s; "
              f"all numbers in {summary['summary_file']}"]
    return "\n".join(lines)


def run_demo(out: str, base_steps: int, qlora_steps: int, seed: int = 1234) -> dict[str, Any]:
    from cpm_live.convert.cli import main as quantize_main
    from cpm_live.training.cli import qlora_main
    from cpm_live.training.plot import main as plot_main

    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    _banner("1/6 vocabulary and tiny config")
    vocab = build_tiny_vocab(os.path.join(out, "vocab.txt"), list(DEMO_WORDS) + [" " + w for w in DEMO_WORDS])
    tokenizer = CPMBeeTokenizer(vocab)
    fp_config = tiny_config(tokenizer.vocab_size)
    fp_config.to_json_file(os.path.join(out, "config.json"))
    int4_config = os.path.join(out, "config-int4.json")
    CPMBeeConfig.from_dict({**fp_config.to_dict(), "int4": True}).to_json_file(int4_config)
    print(f"vocab: {tokenizer.vocab_size} tokens; model: {fp_config.num_layers} layers, d={fp_config.dim_model}")

    _banner("2/6 a small fp32 base model (full fine-tune on adding digits, repeating a word, is it an animal)")
    base_ckpt = train_base(os.path.join(out, "config.json"), vocab, demo_data_file("base_train.jsonl"), out,
                           base_steps, lr=3e-3, batch_size=16, max_length=64, warmup=10, seed=seed, log_interval=20)

    _banner("3/6 compress the base to NF4 (quantize_state_dict)")
    int4_ckpt = os.path.join(out, "base-int4.safetensors")
    quantize_main(["--input-path", base_ckpt, "--output-path", int4_ckpt, "--force"])
    print(f"fp32 checkpoint {os.path.getsize(base_ckpt) / 2**20:.2f} MiB -> "
          f"int4 {os.path.getsize(int4_ckpt) / 2**20:.2f} MiB")

    _banner("4/6 score the 4-bit base alone on the new task")
    base_scores, base_predictions = _generate_and_score(out, "base", int4_config, int4_ckpt, vocab, None)

    _banner("5/6 QLoRA fine-tune on the new task (4-bit frozen base + LoRA)")
    qlora_dir = os.path.join(out, "qlora")
    shutil.rmtree(qlora_dir, ignore_errors=True)  # a rerun starts over: training refuses to overwrite checkpoints
    common = ["--max-length", "64", "--batch-size", "16", "--engine", "torch", "--device", "cpu",
              "--vocab", vocab, "--seed", str(seed), "--inspect-iters", "0", "--no-activation-checkpointing",
              "--lr-decay-style", "constant", "--warmup-iters", "10", "--weight-decay", "0.0", "--epoch", "100",
              "--stop-at-train-iters"]
    qlora_main(["--model-config", int4_config, "--load", int4_ckpt, "--lora-r", "16", "--lora-alpha", "32",
                "--lora-targets", "project_q,project_k,project_v,attention_out,w_0,w_1,w_out",
                "--dataset", demo_data_file("train.jsonl"), "--eval_dataset", demo_data_file("eval.jsonl"),
                "--eval-interval", str(max(qlora_steps // 10, 1)), "--eval-metrics", "accuracy",
                "--early-stop-patience", "100", "--save", qlora_dir, "--save-name", "demo",
                "--save-iters", str(qlora_steps), "--train-iters", str(qlora_steps), "--lr", "3e-3",
                "--log-interval", "1"] + common)
    metrics_file = os.path.join(qlora_dir, "metrics.jsonl")
    records = read_metrics(metrics_file)

    _banner("6/6 score the 4-bit base + adapter, plot the loss")
    adapter = os.path.join(qlora_dir, "demo-delta-best")
    qlora_scores, qlora_predictions = _generate_and_score(out, "qlora", int4_config, int4_ckpt, vocab, adapter)
    loss_plot = os.path.join(out, "loss.png")
    plot_main([metrics_file, "-o", loss_plot, "--force", "--title", f"demo QLoRA run: {TASK}"])

    summary_file = os.path.join(out, "summary.json")
    summary = {"task": TASK, "eval_records": len(_eval_records()),
               "base": base_scores, "qlora": qlora_scores,
               "loss_first": _mean_loss(records, first=True), "loss_last": _mean_loss(records, first=False),
               "qlora_steps": qlora_steps, "adapter": adapter, "loss_plot": loss_plot,
               "examples": _examples({"base": base_predictions, "qlora": qlora_predictions}, EXAMPLES),
               "seed": seed, "summary_file": summary_file,
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(summary_file, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _banner("result: the 4-bit base alone vs with the QLoRA adapter")
    print(format_report(summary), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Tiny CPU QLoRA demo: quantize, score the base, fine-tune, "
                                            "score again, plot.")
    p.add_argument("--out", default="demo_out", help="working directory (default ./demo_out)")
    p.add_argument("--base-steps", type=int, default=600, help="full fine-tuning steps of the stand-in base")
    p.add_argument("--qlora-steps", type=int, default=300, help="QLoRA steps on the new task")
    p.add_argument("--seed", type=int, default=1234, help="seed of both training runs")
    args = p.parse_args(argv)
    set_cpu_threads()
    return run_demo(args.out, args.base_steps, args.qlora_steps, args.seed)


if __name__ == "__main__":
    main()
