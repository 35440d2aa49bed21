"""Per-parameter statistics of plain, FSDP2-sharded (DTensor) and BMTrain-sharded models.

Each rank summarises the piece of every parameter it holds (sum, sum of squares, min, max, count,
in float64) and the pieces are combined across ranks, so no parameter is gathered in full.
Integer tensors (the packed 4-bit codes, 8-bit absmax) are only described: shape, dtype, numel,
bytes; no float statistic is ever asked of them (``std``/``var`` do not exist for integer dtypes,
which is why the original QLoRA script turned inspection off altogether).
"""

from __future__ import annotations

import fnmatch
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

if TYPE_CHECKING:
    from cpm_live.engine.base import Engine


def _is_bmtrain_shard(p: torch.Tensor) -> bool:
    # bmtrain.DistributedParameter, recognised without importing bmtrain: it records the full shape.
    return hasattr(p, "_original_shape")


def _global_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p._original_shape) if _is_bmtrain_shard(p) else tuple(p.shape)


def _local_piece(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """This rank's part of ``t`` and whether the parts of all ranks are disjoint (else replicated)."""
    if isinstance(t, DTensor):
        return t.to_local(), any(isinstance(pl, Shard) for pl in t.placements)
    return t, _is_bmtrain_shard(t)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter data held by this rank (a shard's local slice under FSDP2/BMTrain)."""
    total = 0
    for p in model.parameters():
        piece, _ = _local_piece(p)
        total += piece.numel() * piece.element_size()
    return total


def _moments(t: torch.Tensor | None, counts: bool) -> list[float] | None:
    """``[n, sum, sum_sq, min, max]`` of ``t`` in float64; None when this rank must not count it."""
    if t is None or not counts:
        return None
    t = t.detach().double()
    if t.numel() == 0:
        return [0.0, 0.0, 0.0, math.inf, -math.inf]
    return [float(t.numel()), float(t.sum()), float(t.pow(2).sum()), float(t.min()), float(t.max())]


def _merge(parts: list[list[float] | None]) -> dict[str, float] | None:
    parts = [m for m in parts if m is not None]
    n = sum(m[0] for m in parts)
    if not parts or n == 0:
        return None
    s, sq = sum(m[1] for m in parts), sum(m[2] for m in parts)
    mean = s / n
    var = max(sq - s * mean, 0.0) / (n - 1) if n > 1 else 0.0  # unbiased, like torch.std
    return {"min": min(m[3] for m in parts), "max": max(m[4] for m in parts), "mean": mean,
            "std": math.sqrt(var)}


def _gather(local: Any, engine: Engine | None, sharded: bool) -> list[Any]:
    if engine is not None:
        return engine.all_gather_object(local)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, local)
        return out
    if sharded:
        raise ValueError("this model is sharded by BMTrain: pass engine= so the pieces can be combined")
    return [local]


def inspect_model(model: nn.Module, pattern: str = "*", engine: Engine | None = None) -> list[dict[str, Any]]:
    """One row per parameter whose name matches ``pattern`` (fnmatch): name, shape, dtype, numel,
    bytes, and for floating tensors min/max/mean/std of the values and mean/std of the gradient
    (None where absent). Collective when the model is distributed: call it on every rank."""
    rank = engine.rank if engine is not None else (dist.get_rank() if dist.is_initialized() else 0)
    meta, local, any_bmtrain = [], [], False
    for name, p in model.named_parameters():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        any_bmtrain |= _is_bmtrain_shard(p)
        shape = _global_shape(p)
        numel = math.prod(shape)
        row = {"name": name, "shape": list(shape), "dtype": str(p.dtype).removeprefix("torch."),
               "numel": numel, "bytes": numel * p.element_size()}
        meta.append(row)
        if not (p.is_floating_point() or p.is_complex()):
            local.append((None, None))
            continue
        piece, disjoint = _local_piece(p)
        counts = disjoint or rank == 0  # a replicated tensor is counted once, from rank 0
        grad = _local_piece(p.grad)[0] if p.grad is not None else None
        local.append((_moments(piece, counts), _moments(grad, counts)))
    gathered = _gather(local, engine, any_bmtrain)
    for i, row in enumerate(meta):
        values = _merge([g[i][0] for g in gathered])
        grads = _merge([g[i][1] for g in gathered])
        row.update({k: values[k] if values else None for k in ("min", "max", "mean", "std")})
        row["grad_mean"] = grads["mean"] if grads else None
        row["grad_std"] = grads["std"] if grads else None
    return meta


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def format_summary(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of :func:`inspect_model` rows (integer tensors show only size)."""
    width = max([len(r["name"]) for r in rows] + [4])
    header = (f"{'name':<{width}}  {'shape':>14}  {'dtype':>8}  {'bytes':>10}  {'min':>10}  {'max':>10}  "
              f"{'mean':>10}  {'std':>10}  {'grad_mean':>10}  {'grad_std':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"]) or "scalar"
        lines.append(f"{r['name']:<{width}}  {shape:>14}  {r['dtype']:>8}  {r['bytes']:>10}  "
                     + "  ".join(f"{_fmt(r.get(k)):>10}" for k in ("min", "max", "mean", "std", "grad_mean",
                                                                      "grad_std")))
    return "\n".join(lines)
