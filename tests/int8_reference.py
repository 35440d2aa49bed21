"""LLM.int8 written from its definition in fp64: the reference the int8 layer is tested against (CPU and GPU)."""

import torch


def reference_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 (LLM.int8's weight format), on the weight rounded to fp16, in fp64."""
    w = weight.half().double()
    scale = w.abs().amax(dim=1)
    return torch.round(w * (127.0 / scale.unsqueeze(1))).to(torch.int8), scale.float()


def reference_matmul(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8 in fp64: input columns with any |x| >= threshold go through the dequantized weight in
    full precision; the rest is quantized row-wise (row absmax over the non-outlier entries, as
    bitsandbytes computes it) and multiplied in integers."""
    a = x.reshape(-1, x.shape[-1]).half().double()
    outliers = a.abs() >= threshold if threshold > 0 else torch.zeros_like(a, dtype=torch.bool)
    cols = outliers.any(dim=0)
    sca = a.masked_fill(outliers, 0).abs().amax(dim=1)
    ca = torch.round(a * (127.0 / sca.unsqueeze(1)))
    ca[:, cols] = 0
    w = cb.double() * (scb.double().unsqueeze(1) / 127.0)
    out = (ca @ cb.double().T) * (sca.unsqueeze(1) * scb.double().unsqueeze(0) / 127.0**2)
    out += a[:, cols] @ w[:, cols].T
    return out.reshape(*x.shape[:-1], cb.shape[0])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
