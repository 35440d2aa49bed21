"""QLoRA training through the user's entry points on CUDA, once per engine (part of tools/gpu_check.sh).

A CPM-Bee of d=1024 and 8 layers is fully fine-tuned from random weights on the sum task for 60 steps
(torch engine), compressed to NF4 on the GPU with ``src/quantize_state_dict.py``; then
``src/finetune_cpm_bee_qlora.py`` trains LoRA on both demo tasks under ``torchrun`` with
``--engine bmtrain`` and with ``--engine torch`` (FSDP2 on NCCL). Each run's ``metrics.jsonl`` gives
the losses, tokens/s and the peak CUDA memory of the logging rank; the JSON written to ``--out``
says whether the loss fell.

    python tools/gpu_train_check.py --out gpu_out/train.json --engines bmtrain,torch --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "src" / "cpm_live" / "demo_data"


def make_base(root: Path, device: str) -> tuple[Path, Path, Path]:
    """vocab, int4 config and the NF4 checkpoint of a random model (quantized on CUDA)."""
    import torch

    from cpm_live.demo import DEMO_WORDS
    from cpm_live.models import CPMBee, CPMBeeConfig
    from cpm_live.tokenizers import CPMBeeTokenizer
    from cpm_live.tokenizers.bee import build_tiny_vocab

    vocab = build_tiny_vocab(root / "vocab.txt", list(DEMO_WORDS) + [" " + w for w in DEMO_WORDS])
    config = CPMBeeConfig(vocab_size=CPMBeeTokenizer(vocab).vocab_size, dim_model=1024, num_heads=16, dim_head=64,
                          dim_ff=2560, num_layers=8, half=False)
    config_int4 = root / "config-int4.json"
    CPMBeeConfig.from_dict({**config.to_dict(), "int4": True}).to_json_file(config_int4)
    config.to_json_file(root / "config.json")
    torch.manual_seed(0)
    torch.save(dict(CPMBee(config).state_dict()), root / "random.pt")
    # A base that knows the data format (as the demo's): a short full fine-tune on the sum task only.
    # LoRA alone barely moves a random model: its frozen N(0, 0.02) embedding caps the logits.
    lines = (DATA / "train.jsonl").read_text().splitlines(keepends=True)
    (root / "sum.jsonl").write_text("".join(line for line in lines if "What is the sum?" in line))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(REPO / "src" / "finetune_cpm_bee.py"), "--model-config", str(root / "config.json"),
         "--load", str(root / "random.pt"), "--vocab", str(vocab), "--dataset", str(root / "sum.jsonl"),
         "--save", str(root / "base_run"), "--save-name", "base", "--engine", "torch", "--device", device,
         "--train-iters", "60", "--epoch", "10", "--max-length", "64", "--batch-size", "16", "--lr", "1e-3",
         "--lr-decay-style", "constant", "--warmup-iters", "5", "--weight-decay", "0", "--inspect-iters", "0",
         "--log-interval", "10", "--seed", "1234"])
    int4 = root / "base-int4.safetensors"
    run([sys.executable, str(REPO / "src" / "quantize_state_dict.py"), "--input-path",
         str(root / "base_run" / "base-last.pt"), "--output-path", str(int4), "--device", device, "--force"])
    return Path(vocab), config_int4, int4


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(engine: str, root: Path, vocab: Path, config: Path, ckpt: Path, steps: int, device: str) -> dict:
    save = root / f"run-{engine}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "src" / "finetune_cpm_bee_qlora.py"), "--model-config", str(config), "--load", str(ckpt),
           "--vocab", str(vocab), "--dataset", str(DATA / "train.jsonl"), "--save", str(save),
           "--engine", engine, "--device", device, "--train-iters", str(steps), "--epoch", "50",
           "--max-length", "64", "--batch-size", "16", "--lr", "5e-3", "--lr-decay-style", "constant",
           "--warmup-iters", "2", "--weight-decay", "0", "--lora-r", "16", "--lora-alpha", "32",
           "--lora-targets", "project_q,project_k,project_v,attention_out,w_0,w_1,w_out",
           "--inspect-iters", "0", "--log-interval", "1", "--seed", "1234"]
    started = time.perf_counter()
    run(cmd)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in train_records]
    head = sum(losses[:3]) / len(losses[:3])
    tail = sum(losses[-3:]) / len(losses[-3:])
    return {
        "engine": engine, "world_size": 1, "steps": len(losses), "losses": losses,
        "loss_first3_mean": head, "loss_last3_mean": tail, "loss_fell": tail < head, "loss_drop": 1 - tail / head,
        "peak_memory_mib_rank0": max(r["peak_memory_mb"] for r in train_records),
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in train_records)[len(train_records) // 2],
        "wall_s": seconds,
        "adapter_written": any(p.name.endswith("-delta-last") for p in save.iterdir()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--engines", default="bmtrain,torch")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workdir", default="/tmp/cpm-live-gpu-train")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try this script without a GPU")
    args = p.parse_args(argv)
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)  # a rerun starts clean (a --save dir with checkpoints is refused)
    root.mkdir(parents=True)
    vocab, config, ckpt = make_base(root, args.device)
    results: dict = {"model": {"dim_model": 1024, "num_layers": 8, "dim_ff": 2560, "int4": "nf4"},
                     "tokens_per_step": "16 rows x 64 tokens", "engines": {}}
    for engine in [e for e in args.engines.split(",") if e]:
        try:
            results["engines"][engine] = train(engine, root, vocab, config, ckpt, args.steps, args.device)
        except (subprocess.CalledProcessError, OSError, ValueError) as e:
            results["engines"][engine] = {"error": str(e)}
        print(json.dumps({engine: {k: v for k, v in results["engines"][engine].items() if k != "losses"}}),
              flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    failed = [e for e, r in results["engines"].items() if not r.get("loss_fell")]
    if failed:
        print(f"loss did not fall (or the run failed) for: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    return results


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    main()
