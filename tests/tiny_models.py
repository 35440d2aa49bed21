"""Tiny CPM-Bee configs and a hand-built packed batch, shared by the model, quantization and GPU tests."""

import torch

from cpm_live.models import CPMBee, CPMBeeConfig
from tests.conftest import CONFIG_DIR


def tiny_config(**overrides) -> CPMBeeConfig:
    return CPMBeeConfig.from_json_file(CONFIG_DIR / "cpm-bee-tiny.json", **overrides)


def small_vocab_config() -> CPMBeeConfig:
    """Two layers, d=64, 300 tokens, fp32: the base of the int8 and export-merge checkpoint fixtures."""
    return CPMBeeConfig(vocab_size=300, dim_model=64, num_heads=2, dim_head=32, dim_ff=128, num_layers=2, half=False)


def packed_batch(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows: row 0 packs two instances (spans 0/1) with an in-context example; row 1 is padded."""
    g = torch.Generator().manual_seed(seed)
    B, L = 2, 12
    i32 = torch.int32
    batch = {
        "input": torch.randint(11, vocab_size, (B, L), generator=g, dtype=i32),
        "input_sub": torch.zeros(B, L, dtype=i32),
        "length": torch.tensor([12, 9], dtype=i32),
        "context": torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0],
                                 [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool),
        "sample_ids": torch.tensor([[0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
                                    [0] * 12], dtype=i32),
        "num_segments": torch.tensor([[3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2],
                                      [2] * 9 + [0] * 3], dtype=i32),
        "segment": torch.tensor([[0, 1, 1, 2, 2, 0, 1, 0, 0, 1, 1, 1],
                                 [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]], dtype=i32),
        "segment_rel_offset": torch.tensor([[0, 0, 0, 0, 0, 9, 9, 13, 13, 13, 13, 13],
                                            [0] * 12], dtype=i32),
        "span": torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [0] * 12], dtype=i32),
        "ext_table_ids": torch.tensor([10, 1], dtype=i32),
        "ext_table_sub": torch.tensor([1, 2], dtype=i32),
    }
    rel = torch.randint(2, 66, (B, 17), generator=g, dtype=i32)
    for off, n in ((0, 3), (9, 2), (13, 2)):  # zero diagonals: a segment relates to itself by position
        for s in range(n):
            rel[0, off + s * n + s] = 0
    rel[1, 0] = rel[1, 3] = 0
    batch["segment_rel"] = rel
    batch["input_sub"][0, 2] = 1  # one ext token (rotated embedding)
    return batch


def run(model: CPMBee, batch: dict) -> torch.Tensor:
    return model(batch["input"], batch["input_sub"], batch["length"], batch["context"], batch["sample_ids"],
                 batch["num_segments"], batch["segment"], batch["segment_rel_offset"], batch["segment_rel"],
                 batch["span"], batch["ext_table_ids"], batch["ext_table_sub"])[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius), computed in fp32 whatever the inputs' dtype."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
