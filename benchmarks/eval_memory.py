"""Peak memory of a CPU LoRA run before and after its first ``--eval-metrics accuracy`` evaluation.

    python benchmarks/eval_memory.py --out eval-memory.json [--vocab bee.txt --train a.jsonl --eval b.jsonl]

Trains a 2-layer d=64 CPM-Bee (random init, the real 86k vocabulary when ``--vocab`` is given, else
a synthetic vocabulary of the same size) with LoRA for ``--steps`` steps, evaluating loss and
accuracy (``--max-eval-samples``) once, at the middle step. Each step's ``peak_memory_mb`` in
``metrics.jsonl`` is the process's RSS high-water mark (``ru_maxrss``, the kernel's ``VmHWM``); the
JSON reports it at the step before the evaluation and after it, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 86583  # CPM-Bee's bee.txt


def synthetic_inputs(root: str, records: int) -> tuple[str, str]:
    """A vocab of VOCAB_SIZE entries and CCPM-shaped records made of its first CJK characters."""
    sys.path.insert(0, os.path.join(REPO, "src"))
    from cpm_live.tokenizers import build_tiny_vocab

    vocab = build_tiny_vocab(os.path.join(root, "small.txt"))
    with open(vocab, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 200) if chr(c) not in tokens]
    tokens += chars + [f"<pad_{i}>" for i in range(VOCAB_SIZE - len(tokens) - len(chars))]
    path = os.path.join(root, "bee.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    rng = random.Random(0)
    data = os.path.join(root, "data")
    os.makedirs(data)
    for name, count in (("train", records), ("eval", records)):
        with open(os.path.join(data, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(count):
                options = {f"<option_{k}>": "".join(rng.choice(chars) for _ in range(5)) for k in range(4)}
                record = {"input": "".join(rng.choice(chars) for _ in range(40)), "options": options,
                          "question": "".join(rng.choice(chars) for _ in range(10)),
                          "<ans>": f"<option_{rng.randrange(4)}>"}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", default=None, help="CPM-Bee bee.txt (default: a synthetic vocab of its size)")
    p.add_argument("--train", default=None, help="training records (.jsonl, with --vocab)")
    p.add_argument("--eval", default=None, help="eval records (.jsonl, with --vocab; default --train)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-eval-samples", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        if args.vocab:
            vocab, train, evaluation = args.vocab, args.train, args.eval or args.train
        else:
            vocab, data = synthetic_inputs(root, 300)
            train, evaluation = os.path.join(data, "train.jsonl"), os.path.join(data, "eval.jsonl")
        with open(os.path.join(REPO, "src", "config", "cpm-bee-tiny.json"), encoding="utf-8") as f:
            config = json.load(f)
        config["vocab_size"] = VOCAB_SIZE
        with open(os.path.join(root, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        save = os.path.join(root, "run")
        middle = args.steps // 2
        cmd = [sys.executable, os.path.join(REPO, "src", "finetune_cpm_bee_qlora.py"), "--device", "cpu",
               "--model-config", os.path.join(root, "config.json"), "--vocab", vocab, "--int4",
               "--dataset", train, "--eval_dataset", evaluation,
               "--save", save, "--epoch", "100", "--train-iters", str(args.steps), "--batch-size", "2",
               "--max-length", "512", "--lr", "1e-3", "--warmup-iters", "1", "--eval-interval", str(middle),
               "--eval-metrics", "accuracy", "--max-eval-samples", str(args.max_eval_samples)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        with open(os.path.join(save, "metrics.jsonl"), encoding="utf-8") as f:
            steps = [r for r in map(json.loads, f) if "loss" in r]
        before = next(r["peak_memory_mb"] for r in steps if r["step"] == middle)
        after = steps[-1]["peak_memory_mb"]
    result = {"command": " ".join(sys.argv), "vocab": "real" if args.vocab else "synthetic",
              "eval_step": middle, "steps": args.steps, "max_eval_samples": args.max_eval_samples,
              "peak_before_eval_mb": before, "peak_after_eval_mb": after, "ratio": after / before}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
