"""The end-to-end QLoRA demo on CPU, through the same entry points a user runs.

1. write a small vocabulary and a tiny CPM-Bee config;
2. give the tiny model something to start from: a short full fine-tune on the sum task only, saved
   as an fp32 checkpoint in the original CPM-Bee key layout (a stand-in for a released model);
3. compress it to NF4 with ``quantize_state_dict``;
4. QLoRA-fine-tune the 4-bit model on both bundled tasks (the option task is new to it) and show
   the loss falling; the adapter is saved in peft's format;
5. generate answers for the eval set with the 4-bit base + adapter and score them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from importlib import resources

from cpm_live.models import CPMBeeConfig
from cpm_live.tokenizers import CPMBeeTokenizer
from cpm_live.tokenizers.bee import build_tiny_vocab
from cpm_live.training.metrics import read_metrics

DEMO_WORDS = ("cat dog horse bird fish cow sheep lion tiger bear wolf fox duck goat frog mouse red blue green "
              "apple bread table chair stone river cloud paper glass spoon door window book lamp road sand "
              "milk rice cup box hat Pick animal Which What sum").split()


def demo_data_file(name: str) -> str:
    return str(resources.files("cpm_live") / "demo_data" / name)


def tiny_config(vocab_size: int) -> CPMBeeConfig:
    return CPMBeeConfig(vocab_size=vocab_size, dim_model=128, num_heads=4, dim_head=32, dim_ff=256,
                        num_layers=3, half=False)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(out: str, base_steps: int, qlora_steps: int) -> dict:
    from cpm_live.convert.cli import main as quantize_main
    from cpm_live.evaluation import main as evaluate_main
    from cpm_live.generation.cli import main as generate_main
    from cpm_live.training.cli import main as finetune_main

    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    _banner("1/5 vocabulary and tiny config")
    vocab = build_tiny_vocab(os.path.join(out, "vocab.txt"), [w for w in DEMO_WORDS] + [" " + w for w in DEMO_WORDS])
    tokenizer = CPMBeeTokenizer(vocab)
    fp_config = tiny_config(tokenizer.vocab_size)
    fp_config.to_json_file(os.path.join(out, "config.json"))
    int4_config = CPMBeeConfig.from_dict({**fp_config.to_dict(), "int4": True})
    int4_config.to_json_file(os.path.join(out, "config-int4.json"))
    print(f"vocab: {tokenizer.vocab_size} tokens; model: {fp_config.num_layers} layers, d={fp_config.dim_model}")

    _banner("2/5 a small fp32 base model (short full fine-tune on the sum task)")
    sum_only = os.path.join(out, "sum_train.jsonl")
    with open(demo_data_file("train.jsonl"), encoding="utf-8") as src, open(sum_only, "w", encoding="utf-8") as dst:
        dst.writelines(line for line in src if '"What is the sum?"' in line)
    base_dir = os.path.join(out, "base")
    common = ["--max-length", "64", "--batch-size", "16", "--engine", "torch", "--device", "cpu",
              "--vocab", vocab, "--seed", "1234", "--log-interval", "10", "--inspect-iters", "0",
              "--no-activation-checkpointing", "--lr-decay-style", "constant", "--warmup-iters", "10"]
    finetune_main(["--model-config", os.path.join(out, "config.json"), "--dataset", sum_only,
                   "--save", base_dir, "--save-name", "base", "--epoch", "100", "--train-iters",
                   str(base_steps), "--stop-at-train-iters", "--lr", "3e-3", "--weight-decay", "0.0"] + common)
    base_ckpt = os.path.join(out, "base.pt")
    shutil.copyfile(os.path.join(base_dir, "base-last.pt"), base_ckpt)

    _banner("3/5 compress the base to NF4 (quantize_state_dict)")
    int4_ckpt = os.path.join(out, "base-int4.safetensors")
    quantize_main(["--input-path", base_ckpt, "--output-path", int4_ckpt, "--force"])
    print(f"fp32 checkpoint {os.path.getsize(base_ckpt) / 2**20:.2f} MiB -> "
          f"int4 {os.path.getsize(int4_ckpt) / 2**20:.2f} MiB")

    _banner("4/5 QLoRA fine-tune on both tasks (4-bit frozen base + LoRA)")
    qlora_dir = os.path.join(out, "qlora")
    shutil.rmtree(qlora_dir, ignore_errors=True)  # a rerun starts over: training refuses to overwrite checkpoints
    eval_file = demo_data_file("eval.jsonl")
    finetune_main(["--model-config", os.path.join(out, "config-int4.json"), "--load", int4_ckpt,
                   "--use-delta", "--lora-r", "16", "--lora-alpha", "32",
                   "--lora-targets", "project_q,project_k,project_v,attention_out,w_0,w_1,w_out",
                   "--dataset", demo_data_file("train.jsonl"), "--eval_dataset", eval_file,
                   "--eval-interval", str(max(qlora_steps // 4, 1)), "--early-stop-patience", "100",
                   "--save", qlora_dir, "--save-name", "demo", "--save-iters", str(max(qlora_steps // 2, 1)),
                   "--epoch", "100", "--train-iters", str(qlora_steps), "--stop-at-train-iters", "--lr", "2e-3",
                   "--weight-decay", "0.0"] + common + ["--log-interval", "5"])
    losses = [r["loss"] for r in read_metrics(os.path.join(qlora_dir, "metrics.jsonl")) if "loss" in r]
    head, tail = sum(losses[:3]) / len(losses[:3]), sum(losses[-3:]) / len(losses[-3:])
    print(f"QLoRA train loss: first logged {head:.3f} -> last logged {tail:.3f}")

    _banner("5/5 generate with the 4-bit base + adapter, then score")
    adapter = os.path.join(qlora_dir, "demo-delta-best")
    predictions = os.path.join(out, "predictions.jsonl")
    generate_main(["--model-config", os.path.join(out, "config-int4.json"), "--load", int4_ckpt,
                   "--delta", adapter, "--vocab", vocab, "--input", eval_file, "--output", predictions,
                   "--beam-size", "3", "--max-length", "8", "--device", "cpu"])
    scores_file = os.path.join(out, "scores.json")
    evaluate_main(["--pred", predictions, "--ref", eval_file, "--metrics", "accuracy,rouge,bleu",
                   "--output", scores_file])
    with open(scores_file, encoding="utf-8") as f:
        scores = json.load(f)
    summary = {"loss_first": head, "loss_last": tail, "adapter": adapter, "scores": scores,
               "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Tiny CPU QLoRA demo: quantize, fine-tune, generate, score.")
    p.add_argument("--out", default="demo_out", help="working directory (default ./demo_out)")
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--qlora-steps", type=int, default=200)
    args = p.parse_args(argv)
    return run_demo(args.out, args.base_steps, args.qlora_steps)


if __name__ == "__main__":
    main()
