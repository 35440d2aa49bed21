"""QLoRA training through the user's entry points, once per engine, from a base with something to learn.

Part of ``tools/gpu_check.sh``:

1. the base is the demo's stand-in (:func:`cpm_live.demo.format_base.train_base`): the demo's tiny
   CPM-Bee trained in full from random weights, on CPU, on adding digits, repeating a word and telling
   animals (``demo_data/base_train.jsonl``). A random base gives LoRA nothing to move: its frozen
   N(0, 0.02) embedding caps the logits (format_base's docstring has the arithmetic);
2. ``src/quantize_state_dict.py`` compresses it to NF4 on ``--device``;
3. ``src/finetune_cpm_bee_qlora.py`` trains LoRA on a task new to the base (how many of four words are
   animals, ``demo_data/train.jsonl``) under ``torchrun``, with ``--engine bmtrain`` and with
   ``--engine torch``: the same data, seed and flags.

Each run's ``metrics.jsonl`` gives the losses, tokens/s and the peak memory of the logging rank; the
JSON written to ``--out`` says whether the loss fell (mean of the last 3 steps below the first 3).
On CPU (the dry run) ``--engine bmtrain`` is launched with the same flags and must stop at its
one-line "needs CUDA" error; it is recorded as skipped, every other engine must run.

    python tools/gpu_train_check.py --out gpu_out/train.json                                  # GPU
    python tools/gpu_train_check.py --out /tmp/train.json --device cpu --base-steps 300 --steps 30
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
SEED = 1234
BMTRAIN_NEEDS_CUDA = "--engine bmtrain runs on CUDA only"  # the CLI's error on a machine without CUDA


def make_base(root: Path, base_steps: int, device: str) -> tuple[Path, Path, Path, dict]:
    """vocab, int4 config, the NF4 checkpoint of the format-trained base, and the base run's losses."""
    from cpm_live.demo import DEMO_WORDS
    from cpm_live.demo.format_base import train_base
    from cpm_live.demo.pipeline import tiny_config
    from cpm_live.models import CPMBeeConfig
    from cpm_live.tokenizers import CPMBeeTokenizer
    from cpm_live.tokenizers.bee import build_tiny_vocab
    from cpm_live.training.metrics import read_metrics

    vocab = build_tiny_vocab(root / "vocab.txt", list(DEMO_WORDS) + [" " + w for w in DEMO_WORDS])
    config = tiny_config(CPMBeeTokenizer(vocab).vocab_size)
    config.to_json_file(root / "config.json")
    config_int4 = root / "config-int4.json"
    CPMBeeConfig.from_dict({**config.to_dict(), "int4": True}).to_json_file(config_int4)
    started = time.perf_counter()
    # The demo's own settings (cpm_live.demo.pipeline.run_demo), on CPU: the base is the same on every machine.
    checkpoint = train_base(str(root / "config.json"), str(vocab), str(DATA / "base_train.jsonl"), str(root),
                            base_steps, lr=3e-3, batch_size=16, max_length=64, warmup=10, seed=SEED,
                            log_interval=20)
    losses = [r["loss"] for r in read_metrics(str(root / "train" / "metrics.jsonl")) if "loss" in r]
    base = {"steps": base_steps, "device": "cpu", "loss_first": losses[0], "loss_last": losses[-1],
            "seconds": time.perf_counter() - started}
    print(f"base: full fine-tune from random weights, loss {losses[0]:.3f} -> {losses[-1]:.3f} in {base_steps} "
          f"steps ({base['seconds']:.0f} s)", flush=True)
    int4 = root / "base-int4.safetensors"
    run([sys.executable, str(REPO / "src" / "quantize_state_dict.py"), "--input-path", checkpoint,
         "--output-path", str(int4), "--device", device, "--force"])
    return Path(vocab), config_int4, int4, base


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd``, echoing its output; raise CalledProcessError (with the output) on failure."""
    print("+ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(done.stdout, end="", flush=True)
    done.check_returncode()
    return done


def qlora_command(engine: str, root: Path, vocab: Path, config: Path, ckpt: Path, steps: int,
                  device: str) -> list[str]:
    """The QLoRA run of one engine; only ``--engine`` and ``--save`` differ between engines."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(REPO / "src" / "finetune_cpm_bee_qlora.py"), "--model-config", str(config), "--load", str(ckpt),
            "--vocab", str(vocab), "--dataset", str(DATA / "train.jsonl"), "--save", str(root / f"run-{engine}"),
            "--engine", engine, "--device", device, "--train-iters", str(steps), "--epoch", "100",
            "--max-length", "64", "--batch-size", "16", "--lr", "3e-3", "--lr-decay-style", "constant",
            "--warmup-iters", "2", "--weight-decay", "0", "--lora-r", "16", "--lora-alpha", "32",
            "--lora-targets", "project_q,project_k,project_v,attention_out,w_0,w_1,w_out",
            "--inspect-iters", "0", "--log-interval", "1", "--seed", str(SEED)]


def summarize_losses(losses: list[float]) -> dict:
    head = sum(losses[:3]) / len(losses[:3])
    tail = sum(losses[-3:]) / len(losses[-3:])
    return {"loss_first3_mean": head, "loss_last3_mean": tail, "loss_fell": tail < head, "loss_drop": 1 - tail / head}


def train(engine: str, root: Path, vocab: Path, config: Path, ckpt: Path, steps: int, device: str) -> dict:
    save = root / f"run-{engine}"
    cmd = qlora_command(engine, root, vocab, config, ckpt, steps, device)
    if engine == "bmtrain" and device == "cpu":
        # As far as a CPU goes: the same command line parses, and the engine refuses with its one line.
        print("+ " + " ".join(cmd), flush=True)
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        refused = done.returncode != 0 and BMTRAIN_NEEDS_CUDA in done.stdout
        if not refused:
            print(done.stdout, end="")
            return {"engine": engine, "error": f"expected the one-line '{BMTRAIN_NEEDS_CUDA}' error on CPU, got "
                                              f"exit {done.returncode}"}
        line = next(x for x in done.stdout.splitlines() if BMTRAIN_NEEDS_CUDA in x)
        return {"engine": engine, "skipped": f"no CUDA here; the CLI stopped with: {line.strip()}"}
    started = time.perf_counter()
    run(cmd)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in train_records]
    return {
        "engine": engine, "device": device, "world_size": 1, "steps": len(losses), "losses": losses,
        **summarize_losses(losses),
        "peak_memory_mib_rank0": max(r["peak_memory_mb"] for r in train_records),
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in train_records)[len(train_records) // 2],
        "wall_s": seconds,
        "adapter_written": any(p.name.endswith("-delta-last") for p in save.iterdir()),
    }


def loss_line(engine: str, r: dict) -> str:
    """One line per engine for the log and the summary: the loss falling (or not), or why it did not run."""
    if "losses" not in r:
        return f"{engine}: " + (f"skipped ({r['skipped']})" if "skipped" in r else f"FAILED ({r.get('error')})")
    every = max(1, len(r["losses"]) // 8)
    curve = " ".join(f"{x:.2f}" for x in r["losses"][::every])
    verdict = "fell" if r["loss_fell"] else "did NOT fall"
    return (f"{engine}: loss {r['loss_first3_mean']:.3f} -> {r['loss_last3_mean']:.3f} (first/last 3 steps) "
            f"{verdict} in {r['steps']} steps; every {every}: {curve}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--engines", default="bmtrain,torch")
    p.add_argument("--steps", type=int, default=40, help="QLoRA steps per engine")
    p.add_argument("--base-steps", type=int, default=600, help="full fine-tuning steps of the base (the demo's)")
    p.add_argument("--workdir", default="/tmp/cpm-live-gpu-train")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda; cpu for the dry run")
    args = p.parse_args(argv)
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)  # a rerun starts clean (a --save dir with checkpoints is refused)
    root.mkdir(parents=True)
    vocab, config, ckpt, base = make_base(root, args.base_steps, args.device)
    results: dict = {"base": {"model": "the demo's tiny CPM-Bee (d=128, 3 layers), format-trained; nf4",
                              "data": "demo_data/base_train.jsonl", **base},
                     "task": "demo_data/train.jsonl (how many of four words are animals; new to the base)",
                     "tokens_per_step": "16 rows x 64 tokens", "seed": SEED, "engines": {}}
    for engine in [e for e in args.engines.split(",") if e]:
        try:
            results["engines"][engine] = train(engine, root, vocab, config, ckpt, args.steps, args.device)
        except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as e:
            results["engines"][engine] = {"engine": engine, "error": str(e)}
        print(loss_line(engine, results["engines"][engine]), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    failed = [e for e, r in results["engines"].items() if "skipped" not in r and not r.get("loss_fell")]
    if failed:
        print(f"loss did not fall (or the run failed) for: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    return results


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))
    main()
