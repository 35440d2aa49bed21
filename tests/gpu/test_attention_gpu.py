"""The fused attention path on CUDA against CPM-Bee's eager attention, in bf16 and fp16.

On CUDA a float mask rules out the flash kernel; torch then picks cuDNN (sm90/100 with a recent
cuDNN, mask without gradient) or the memory-efficient kernel, which also returns the mask's gradient
(full fine-tuning trains the bias table). These tests check that one of those ran, not the math
fallback, and that logits and gradients agree with the eager formula in the same dtype.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cpm_live.data.tensors import IGNORE_INDEX
from cpm_live.layers.attention import QUERY_BLOCK, Attention
from cpm_live.lora import LoraSettings, add_lora
from cpm_live.models import CPMBee, CPMBeeConfig
from tests.unit.layers.test_attention import SEVEN, eager_forward

CONFIG = CPMBeeConfig(vocab_size=512, dim_model=128, num_heads=4, dim_head=32, dim_ff=256, num_layers=2, half=False)
FUSED = ("aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention")


def _batch(length: int = QUERY_BLOCK + 40) -> tuple[dict, torch.Tensor]:
    """Two rows longer than a query block: a context prefix then a causal tail; row 1 is padded."""
    g = torch.Generator().manual_seed(0)
    i32 = torch.int32
    context = torch.zeros(2, length, dtype=torch.bool)
    context[:, : length // 3] = True
    batch = {
        "input": torch.randint(11, CONFIG.vocab_size, (2, length), generator=g, dtype=i32),
        "input_sub": torch.zeros(2, length, dtype=i32), "length": torch.tensor([length, length - 50], dtype=i32),
        "context": context, "sample_ids": torch.zeros(2, length, dtype=i32),
        "num_segments": torch.full((2, length), 2, dtype=i32), "segment": (~context).to(i32),
        "segment_rel_offset": torch.zeros(2, length, dtype=i32),
        "segment_rel": torch.tensor([[0, 2, 3, 0]] * 2, dtype=i32), "span": torch.zeros(2, length, dtype=i32),
        "ext_table_ids": torch.tensor([0], dtype=i32), "ext_table_sub": torch.tensor([0], dtype=i32),
    }
    targets = torch.randint(0, CONFIG.vocab_size, (2, length), generator=g)
    targets[context] = IGNORE_INDEX
    targets[1, length - 50:] = IGNORE_INDEX
    return {k: v.cuda() for k, v in batch.items()}, targets.cuda()


def _run(dtype: torch.dtype, lora: bool, eager: bool, monkeypatch):
    torch.manual_seed(1)
    model = CPMBee(CONFIG).to(device="cuda", dtype=dtype)
    if lora:
        add_lora(model, LoraSettings(targets=SEVEN))
    batch, targets = _batch()
    with monkeypatch.context() as m:
        if eager:
            m.setattr(Attention, "forward", eager_forward)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            logits, _ = model(**batch)
            loss, _ = model(**batch, targets=targets)
            loss.backward()
    ops = {e.key for e in prof.key_averages()}
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return logits.float(), grads, ops


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-fine-tuning"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_fused_attention_matches_eager_on_cuda(monkeypatch, dtype, tol, lora):
    logits, grads, ops = _run(dtype, lora, eager=False, monkeypatch=monkeypatch)
    ref_logits, ref_grads, _ = _run(dtype, lora, eager=True, monkeypatch=monkeypatch)
    assert any(op in ops for op in FUSED), sorted(op for op in ops if "attention" in op)
    assert "aten::_scaled_dot_product_attention_math" not in ops
    assert torch.isfinite(logits).all()
    assert _relative(logits, ref_logits) < tol
    assert ("position_bias.relative_attention_bias" in grads) != lora  # the bias table's gradient, when it trains
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert _relative(grad, ref_grads[name]) < 5 * tol, name
