"""Attention through scaled_dot_product_attention, per query block, against CPM-Bee's eager attention."""

import math

import pytest
import torch

from cpm_live.data.tensors import IGNORE_INDEX
from cpm_live.layers import attention as attention_module
from cpm_live.layers.attention import Attention, attention_bias
from cpm_live.lora import LoraSettings, add_lora
from cpm_live.models import CPMBee
from tests.reference_cpmbee import reference_logits
from tests.tiny_models import packed_batch, run, tiny_config

SEVEN = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")


def eager_forward(self, x, bias, query_valid, key_ranges, past_kv=None):
    """CPM-Bee's attention as its training code writes it: q and k each divided by dh^(1/4), the
    score matrix plus the (masked) bias, softmax, masked entries and padding rows zeroed."""
    batch, len_q, _ = x.shape
    scale = math.sqrt(math.sqrt(self.dim_head))
    q = self._heads(self.project_q(x) / scale)
    k = self._heads(self.project_k(x) / scale)
    v = self._heads(self.project_v(x))
    if past_kv is not None:
        k, v = torch.cat([past_kv[0], k], dim=-2), torch.cat([past_kv[1], v], dim=-2)
    masked = torch.isinf(bias)
    score = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1).masked_fill(masked, 0.0)
    if self.training and self.dropout_p:
        score = torch.nn.functional.dropout(score, self.dropout_p)
    out = (score @ v).transpose(1, 2).reshape(batch, len_q, -1) * query_valid
    return self.attention_out(out), (k, v)


@pytest.fixture
def small_blocks(monkeypatch):
    """Query blocks of 5 rows and keys aligned to 4, so the 12-token test rows span several blocks
    whose key ranges differ (packed spans, causal tails, padding)."""
    monkeypatch.setattr(attention_module, "QUERY_BLOCK", 5)
    monkeypatch.setattr(attention_module, "KEY_ALIGN", 4)


@pytest.mark.parametrize("blocks", ["default", "small"])
def test_logits_match_the_independent_reference(request, blocks):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    config = tiny_config()
    torch.manual_seed(0)
    model = CPMBee(config).eval()
    batch = packed_batch(config.vocab_size)
    logits = run(model, batch)
    ref = reference_logits(model.state_dict(), config, batch)
    assert ((logits - ref).abs().max() / ref.abs().max()).item() < 1e-4  # padding rows included


def test_key_ranges_cover_every_visible_key(small_blocks):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 23, 29, generator=g) < 0.15
    mask[:, :, :9] = False  # no query sees the first keys: every range starts after them
    mask[1, 20:] = False  # padding queries
    bias, query_valid, ranges = attention_bias(torch.zeros(2, 3, 23, 29), mask.clone())
    assert ranges.device.type == "cpu" and ranges.shape == (5, 3)
    for i, (start, end, blind) in enumerate(ranges.tolist()):
        rows = mask[:, i * 5:(i + 1) * 5]
        seen = rows.any(dim=(0, 1)).nonzero().flatten()
        assert start % 4 == 0 and (end % 4 == 0 or end == 29) and start < end
        assert seen.min() >= start and seen.max() < end and start >= 8
        assert blind == int(not rows.any(dim=-1).all())  # some query of the block sees nothing
    assert torch.equal(query_valid[..., 0], mask.any(-1))
    assert torch.equal(torch.isinf(bias), (~mask & mask.any(-1, keepdim=True))[:, None].expand_as(bias))


def test_padding_queries_give_zeros_and_finite_gradients(small_blocks):
    torch.manual_seed(1)
    layer = Attention(16, 2, 8, lambda i, o: torch.nn.Linear(i, o, bias=False))
    x = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.ones(2, 7, 7, dtype=torch.bool).tril()
    mask[1, 4:] = False  # row 1: the last three queries see nothing
    mask[1, :, 4:] = False
    out, _ = layer(x, *attention_bias(torch.randn(2, 2, 7, 7), mask))
    out.sum().backward()
    assert torch.equal(out[1, 4:], torch.zeros(3, 16)) and torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1, 4:], torch.zeros(3, 16))


def _loss(model, batch, targets):
    loss, _ = model(**batch, targets=targets)
    return loss


def _targets(config, batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, config.vocab_size, batch["input"].shape, generator=g)
    targets[batch["context"].bool()] = IGNORE_INDEX
    return targets


@pytest.mark.parametrize("lora", [False, True], ids=["full-fine-tuning", "lora"])
def test_gradients_equal_eager_attention(monkeypatch, small_blocks, lora):
    """Full fine-tuning trains the bias table (torch's math kernel, the bias gets its gradient);
    LoRA freezes it (the CPU flash kernel)."""
    config = tiny_config()
    batch = packed_batch(config.vocab_size, seed=4)
    targets = _targets(config, batch)

    def grads(eager: bool):
        torch.manual_seed(3)
        model = CPMBee(config)
        if lora:
            add_lora(model, LoraSettings(targets=SEVEN))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, 0.1)
        with monkeypatch.context() as m:
            if eager:
                m.setattr(Attention, "forward", eager_forward)
            _loss(model, batch, targets).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fused, eager = grads(False), grads(True)
    assert ("position_bias.relative_attention_bias" in fused) != lora
    assert set(fused) == set(eager) and all(g is not None for g in fused.values())
    for name in fused:
        torch.testing.assert_close(fused[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full-fine-tuning", "lora"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_twenty_training_steps_match_eager_attention(monkeypatch, small_blocks, dtype, rtol, lora):
    config = tiny_config()
    batch = packed_batch(config.vocab_size, seed=6)
    targets = batch["input"].long().masked_fill(batch["context"].bool(), IGNORE_INDEX)  # learnable: copy

    def losses(eager: bool) -> list[float]:
        torch.manual_seed(8)
        model = CPMBee(config).to(dtype)
        if lora:
            add_lora(model, LoraSettings(targets=SEVEN))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        out = []
        with monkeypatch.context() as m:
            if eager:
                m.setattr(Attention, "forward", eager_forward)
            for _ in range(20):
                loss = _loss(model, batch, targets) / int((targets != IGNORE_INDEX).sum())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                out.append(float(loss.detach()))
        return out

    fused, eager = losses(False), losses(True)
    assert fused[-1] < fused[0] - 0.1  # it trains
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=rtol, atol=0.0)


def test_padded_batch_trains_without_nan(small_blocks):
    config = tiny_config()
    batch = packed_batch(config.vocab_size, seed=9)
    batch["length"] = torch.tensor([12, 4], dtype=torch.int32)  # row 1 is two thirds padding
    targets = _targets(config, batch, seed=10)
    torch.manual_seed(11)
    model = add_lora(CPMBee(config), LoraSettings(targets=SEVEN))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = _loss(model, batch, targets)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
    logits = run(model.eval(), batch)
    assert torch.isfinite(logits).all()


def test_dropout_runs_in_training_only():
    config = tiny_config(dropout_p=0.5)
    torch.manual_seed(12)
    model = CPMBee(config)
    batch = packed_batch(config.vocab_size)
    assert not torch.equal(run(model, batch), run(model, batch))  # two dropout masks
    model.eval()
    assert torch.equal(run(model, batch), run(model, batch))


def test_incremental_decoding_over_several_query_blocks(small_blocks):
    """A prompt longer than a query block, then tokens one at a time, equals one full forward."""
    config = tiny_config()
    torch.manual_seed(13)
    model = CPMBee(config).eval()
    L, P = 17, 11
    g = torch.Generator().manual_seed(14)
    ids = torch.randint(11, config.vocab_size, (1, L), generator=g, dtype=torch.int32)
    zeros = torch.zeros(1, L, dtype=torch.int32)
    ones = torch.ones(1, L, dtype=torch.int32)
    context = torch.tensor([[1] * P + [0] * (L - P)], dtype=torch.bool)
    seg_rel, ext = torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    full = model(ids, zeros, torch.tensor([L], dtype=torch.int32), context, zeros, ones, zeros, zeros, seg_rel,
                 zeros, ext, ext)[0]
    position = torch.arange(L, dtype=torch.int32)[None]
    steps, state = [], None
    for part in [slice(0, P)] + [slice(t, t + 1) for t in range(P, L)]:
        logits, _, state = model.inference(ids[:, part], zeros[:, part], position[:, part], context[:, part],
                                           zeros[:, part], ones[:, part], zeros[:, part], zeros[:, part], seg_rel,
                                           ext, ext, past_key_values=state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
