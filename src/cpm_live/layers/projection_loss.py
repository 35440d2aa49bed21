"""Summed cross entropy of CPM-Bee's two-part logits, without materialising the logits.

The logits of a token are ``[a Wᵀ ; c Xᵀ]`` (vocabulary, then the ext table). Projecting every
labelled token onto the vocabulary, concatenating the ext columns and running log-softmax keeps
several ``(N, V)`` fp32 tensors alive (logits, log-probabilities, their gradient) and pays for the
concatenation, the log-softmax forward and backward and a zero fill over them (2.0 s beside 5.8 s of
loss matmuls in a 2048-token step at d=1024, vocabulary 32k, one CPU thread). Here rows are taken a
chunk at a time:
the chunk's logits give its loss and, when a gradient is wanted, at once the gradient of the loss
with respect to ``a``, ``c`` (and ``W``, ``X`` if they train), so only one chunk of logits ever
exists, and none is kept for backward, which only scales the stored gradients by the incoming one
(a scalar).
"""

from __future__ import annotations

import torch

# Logits of one chunk: 128 MiB in bf16, 2048 rows of a 32k vocabulary. Each chunk's two matmuls read
# (and the BLAS packs) the whole (V, d) weight again: in 16 chunks of 131 rows they took 6.7 s of a
# 2048-token step at d=1024, the same products in one call 4.5 s (1 CPU thread, torch.profiler).
CHUNK_LOGITS = 2**26
# Rows whose softmax is formed at a time, in fp32, within a chunk's logits (which stay in the compute
# dtype): 32 rows of a 32k vocabulary are 4 MiB, so the fp32 rows stay in cache and are rounded back
# over the chunk's own logits, where converting the whole chunk to fp32 and its gradient back cost
# 1.05 s of `copy_` in a 13 s bf16 step at d=1024, 2048 tokens (1 thread, torch.profiler).
SOFTMAX_ROWS = 32
# Chunks are whole multiples of this many rows, the remainder (under 16 rows) a chunk of its own: the
# CPU BLAS took 3-8% longer for 2047 rows than for 2048 or 2040 (bf16, 1 thread), and a 2048-token
# row has 2047 labelled tokens.
ROW_MULTIPLE = 16


def _chunks(n: int, rows: int) -> list[slice]:
    """Slices covering ``range(n)``: chunks of ``rows`` rows, the last split into its whole multiple
    of :data:`ROW_MULTIPLE` rows and the remainder."""
    rows = max(ROW_MULTIPLE, rows // ROW_MULTIPLE * ROW_MULTIPLE)
    bounds = list(range(0, n, rows))
    tail = bounds[-1] + (n - bounds[-1]) // ROW_MULTIPLE * ROW_MULTIPLE if bounds else 0
    if bounds and bounds[-1] < tail < n:
        bounds.append(tail)
    return [slice(start, end) for start, end in zip(bounds, [*bounds[1:], n])]


def _rows_of_loss(logits_v: torch.Tensor, logits_x: torch.Tensor, t: torch.Tensor, vocab: int,
                  grad_total: torch.Tensor | None, want_grad: bool) -> torch.Tensor:
    """Loss sum of rows with logits ``[logits_v ; logits_x]`` (any float dtype) and targets ``t``; with
    ``want_grad``, overwrites the logits with ``d loss / d logits`` (times ``grad_total`` when given),
    computed in fp32 and rounded once into the logits' dtype."""
    in_vocab = t < vocab
    t_v, t_x = t.clamp(max=vocab - 1), (t - vocab).clamp(min=0)  # the target's column in either part
    lv, lx = logits_v.float(), logits_x.float()  # the logits themselves when already fp32
    picked = torch.where(in_vocab, lv.gather(1, t_v[:, None])[:, 0], lx.gather(1, t_x[:, None])[:, 0])
    # log-sum-exp with exp(logits - max) written over the logits (torch.logsumexp would allocate a copy)
    top = torch.maximum(lv.amax(dim=-1), lx.amax(dim=-1))[:, None]  # (r, 1)
    exp_v, exp_x = lv.sub_(top).exp_(), lx.sub_(top).exp_()
    exp_sum = exp_v.sum(dim=-1, keepdim=True) + exp_x.sum(dim=-1, keepdim=True)  # (r, 1)
    total = (top + exp_sum.log()).sum() - picked.sum()
    if want_grad:
        # d loss / d logits = softmax - one_hot(target), times grad_total; formed in place.
        weight_of_row = exp_sum.reciprocal() if grad_total is None else grad_total / exp_sum
        one = torch.ones_like(top) if grad_total is None else grad_total.expand_as(top)
        probs_v, probs_x = exp_v.mul_(weight_of_row), exp_x.mul_(weight_of_row)
        # Minus one at each row's target, in whichever part it lies (no boolean indexing: no device sync).
        probs_v.scatter_add_(1, t_v[:, None], -one * in_vocab[:, None])
        probs_x.scatter_add_(1, t_x[:, None], -one * ~in_vocab[:, None])
        if probs_v is not logits_v:  # what autograd hands the matmul's backward: rounded once, after scaling
            logits_v.copy_(probs_v)
            logits_x.copy_(probs_x)
    return total


def _sum_chunks(a: torch.Tensor, weight: torch.Tensor, c: torch.Tensor, ext: torch.Tensor, targets: torch.Tensor,
                need: tuple[bool, bool, bool, bool], grad_total: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Loss sum (fp32) and the gradients ``need``-ed of ``(a, weight, c, ext)``, those of the loss times
    ``grad_total`` when given; targets ``(N,)`` index the columns of ``[a Wᵀ ; c Xᵀ]``."""
    n, vocab = a.size(0), weight.size(0)
    rows = max(1, CHUNK_LOGITS // (vocab + ext.size(0)))
    grads: list[torch.Tensor | None] = [
        torch.empty_like(a) if need[0] else None,
        torch.zeros_like(weight, dtype=torch.float32) if need[1] else None,  # sums over chunks: fp32
        torch.empty_like(c) if need[2] else None,
        torch.zeros_like(ext, dtype=torch.float32) if need[3] else None,
    ]
    total = torch.zeros((), dtype=torch.float32, device=a.device)
    for part in _chunks(n, rows):
        a_c, c_c, t = a[part], c[part], targets[part]
        logits_v, logits_x = a_c @ weight.t(), c_c @ ext.t()  # (r, V), (r, X) in the compute dtype
        for sub in range(0, logits_v.size(0), SOFTMAX_ROWS):
            block = slice(sub, sub + SOFTMAX_ROWS)
            total += _rows_of_loss(logits_v[block], logits_x[block], t[block], vocab, grad_total, any(need))
        for i, (d, table, inp) in ((0, (logits_v, weight, a_c)), (2, (logits_x, ext, c_c))):
            if grads[i] is not None:
                torch.mm(d, table, out=grads[i][part])
            if grads[i + 1] is not None:
                if d.dtype == torch.float32:
                    grads[i + 1].addmm_(d.t(), inp)
                else:
                    grads[i + 1].add_(torch.mm(d.t(), inp))
    return total, grads


class _ProjectionCrossEntropy(torch.autograd.Function):
    """Gradients formed in forward and scaled in backward; for fp16, whose range needs the incoming
    gradient (the loss scale) before rounding, recomputed in backward instead (one more logits matmul)."""

    @staticmethod
    def forward(ctx, a, weight, c, ext, targets):
        need = tuple(ctx.needs_input_grad[:4])
        ctx.recompute = a.dtype == torch.float16
        total, grads = _sum_chunks(a, weight, c, ext, targets, (False,) * 4 if ctx.recompute else need)
        if ctx.recompute:
            ctx.save_for_backward(a, weight, c, ext, targets)
        else:
            ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.need = need
        ctx.dtypes = (a.dtype, weight.dtype, c.dtype, ext.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.recompute:
            grads = _sum_chunks(*ctx.saved_tensors, ctx.need, grad_total.float())[1]
        else:
            grads = [g * grad_total if needed else None for g, needed in zip(ctx.saved_tensors, ctx.need)]
        return (*(g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)), None)


def projection_cross_entropy(a: torch.Tensor, weight: torch.Tensor, c: torch.Tensor, ext: torch.Tensor,
                             targets: torch.Tensor) -> torch.Tensor:
    """``sum_i CE([a_i Wᵀ ; c_i Xᵀ], targets_i)`` in fp32: ``a``, ``c`` ``(N, d)``, ``weight (V, d)``,
    ``ext (X, d)``, ``targets (N,)`` in ``[0, V + X)``. Equals ``F.cross_entropy(cat(logits).float(),
    targets, reduction="sum")`` and its gradients, with one chunk of logits alive at a time."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (a, weight, c, ext)):
        return _ProjectionCrossEntropy.apply(a, weight, c, ext, targets)
    return _sum_chunks(a, weight, c, ext, targets, (False,) * 4)[0]
