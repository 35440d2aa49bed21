"""Shared fixtures: a tiny trained CPM-Bee (fp and int4 checkpoints) for the training tests."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cpm_live.convert.compress import quantize_state_dict
from cpm_live.demo import DEMO_WORDS
from cpm_live.models import CPMBee, CPMBeeConfig
from cpm_live.tokenizers import CPMBeeTokenizer
from cpm_live.tokenizers.bee import build_tiny_vocab
from cpm_live.training.cli import main as finetune

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "src" / "cpm_live" / "demo_data"
CONFIG_DIR = REPO / "src" / "config"
# The real vocab and CCPM data of the team's shared folder; tests that need them skip without it.
SHARED = REPO.parent / "shared" / "cpm-bee"


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Each test starts from the same RNG state whatever ran before it (file-level seed fixtures still apply)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A vocab, fp and int4 configs, and an fp checkpoint with its compressed twin."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = build_tiny_vocab(root / "vocab.txt", list(DEMO_WORDS) + [" " + w for w in DEMO_WORDS])
    config = CPMBeeConfig(vocab_size=CPMBeeTokenizer(vocab).vocab_size, dim_model=64, num_heads=2, dim_head=32,
                          dim_ff=128, num_layers=2, half=False)
    config.to_json_file(root / "config.json")
    CPMBeeConfig.from_dict({**config.to_dict(), "int4": True}).to_json_file(root / "config-int4.json")
    rng = random.Random(0)
    (root / "options.jsonl").write_text("".join(json.dumps(option_sample(rng)) + "\n" for _ in range(400)))
    torch.manual_seed(0)
    torch.save(dict(CPMBee(config).state_dict()), root / "random.pt")
    # A base that knows the data format: a short full fine-tune on the demo's base tasks (sum, repeat a
    # word). LoRA cannot start from random weights: the frozen N(0, 0.02) embedding caps how confident
    # logits can be.
    args = base_args(root, root / "base_run", 80, "--model-config", str(root / "config.json"),
                     "--load", str(root / "random.pt"), "--lr", "1e-2", "--save-name", "base")
    args[args.index("--dataset") + 1] = str(DATA / "base_train.jsonl")
    finetune(args)
    (root / "base_run" / "base-last.pt").rename(root / "base.pt")
    quantize_state_dict(root / "base.pt", root / "base-int4.safetensors")
    return root


def option_sample(rng: random.Random) -> dict:
    """A CPM-Bee option task new to the tiny base: which option is an animal (answer `<option_k>`)."""
    animals, others = DEMO_WORDS[:16], DEMO_WORDS[16:40]
    answer = rng.randrange(4)
    words = rng.sample(others, 3)
    words.insert(answer, rng.choice(animals))
    return {"input": "Pick the animal.", "options": {f"<option_{i}>": w for i, w in enumerate(words)},
            "question": "Which one is an animal?", "<ans>": f"<option_{answer}>"}


def base_args(tiny: Path, save: Path, steps: int, *extra: str) -> list[str]:
    return ["--vocab", str(tiny / "vocab.txt"), "--dataset", str(DATA / "train.jsonl"), "--save", str(save),
            "--train-iters", str(steps), "--stop-at-train-iters", "--epoch", "50", "--max-length", "64",
            "--batch-size", "8", "--engine", "torch", "--device", "cpu", "--lr-decay-style", "constant",
            "--warmup-iters", "2", "--weight-decay", "0", "--inspect-iters", "0", "--no-activation-checkpointing",
            *extra]


