"""The chunked cross entropy of CPM-Bee's two-part logits against log-softmax over the concatenated logits."""

import pytest
import torch
import torch.nn.functional as F

from cpm_live.layers import projection_loss
from cpm_live.layers.projection_loss import projection_cross_entropy


def _case(n: int, vocab: int, ext: int, dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, c = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    weight, table = torch.randn(vocab, dim, generator=g), torch.randn(ext, dim, generator=g)
    targets = torch.randint(0, vocab + ext, (n,), generator=g)
    targets[:3] = torch.tensor([0, vocab - 1, vocab + ext - 1])  # both ends of both parts
    return [a, weight, c, table, targets]


def _reference(a, weight, c, table, targets):
    logits = torch.cat([a @ weight.t(), c @ table.t()], dim=-1)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _loss_and_grads(fn, tensors, dtype):
    inputs = [t.to(dtype).requires_grad_() for t in tensors[:4]]
    loss = fn(*inputs, tensors[4])
    (loss * 0.5).backward()  # a non-unit incoming gradient, as the loop's 1/token-count weight
    return loss.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("chunk,softmax_rows", [(2**22, 32), (64, 5)], ids=["one-chunk", "many-chunks"])
def test_fp32_loss_and_gradients_equal_log_softmax_over_the_concatenation(monkeypatch, chunk, softmax_rows):
    monkeypatch.setattr(projection_loss, "CHUNK_LOGITS", chunk)  # 64 logits: chunks of 16 rows here
    monkeypatch.setattr(projection_loss, "SOFTMAX_ROWS", softmax_rows)  # blocks that straddle no chunk
    tensors = _case(n=45, vocab=40, ext=3, dim=8, seed=0)
    loss, grads = _loss_and_grads(projection_cross_entropy, tensors, torch.float32)
    expected, expected_grads = _loss_and_grads(_reference, tensors, torch.float32)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_agrees_with_the_fp32_reference(monkeypatch, dtype):
    monkeypatch.setattr(projection_loss, "CHUNK_LOGITS", 200)
    tensors = _case(n=32, vocab=60, ext=4, dim=16, seed=1)
    rounded = [t.to(dtype).float() for t in tensors[:4]] + [tensors[4]]  # the same inputs, exactly
    loss, grads = _loss_and_grads(projection_cross_entropy, tensors, dtype)
    expected, expected_grads = _loss_and_grads(_reference, rounded, torch.float32)
    assert loss.dtype == torch.float32
    # The logits are rounded to the dtype (as the model's own matmul output is); gradients once more.
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=1e-2)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert (got.float() - want).norm() <= 0.03 * want.norm()


def test_fp16_gradients_are_scaled_before_they_are_rounded():
    """A loss scale lifts probabilities far below fp16's range into it, as autograd's own path does."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(3000, 8, generator=g) * 0.3
    weight[0] = torch.tensor([3.0] + [0.0] * 7)
    targets = torch.zeros(4, dtype=torch.long)
    a = torch.tensor([[10.0] + [0.0] * 7] * 4)  # the target's logit (30) stands out: the rest are < 1e-7
    c, table = torch.zeros(4, 8), torch.zeros(1, 8)
    a16 = a.half().requires_grad_()
    (projection_cross_entropy(a16, weight.half(), c.half(), table.half(), targets) * 2.0**16).backward()
    ref = a.half().float().requires_grad_()
    (_reference(ref, weight.half().float(), c, table, targets) * 2.0**16).backward()
    assert (a16.grad.float() - ref.grad).norm() <= 0.01 * ref.grad.norm()


def test_without_gradients_only_the_loss_is_computed():
    tensors = _case(n=7, vocab=30, ext=2, dim=4, seed=3)
    with torch.no_grad():
        loss = projection_cross_entropy(*[t.requires_grad_() if t.is_floating_point() else t for t in tensors])
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _reference(*tensors).detach(), rtol=1e-6, atol=1e-5)


def test_no_rows_give_zero_and_a_gradient_path():
    a = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    loss = projection_cross_entropy(a, weight, torch.zeros(0, 4), torch.randn(1, 4), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and a.grad.shape == (0, 4) and torch.equal(weight.grad, torch.zeros(10, 4))


@pytest.mark.parametrize("n,rows", [(2047, 2097), (2048, 2097), (4095, 2097), (5, 2097), (17, 16), (40, 7), (0, 9)])
def test_chunks_cover_every_row_once_in_whole_multiples_of_16(n, rows):
    chunks = projection_loss._chunks(n, rows)
    assert [i for part in chunks for i in range(n)[part]] == list(range(n))
    assert all(part.stop - part.start <= max(16, rows) for part in chunks)
    assert all((part.stop - part.start) % 16 == 0 for part in chunks[:-1])
    assert sum((part.stop - part.start) % 16 != 0 for part in chunks) <= 1
