"""One projection, forward + backward: this project's Linear4bit + LoRA vs the Hugging Face QLoRA stack.

The HF stack is what ``transformers`` + ``peft`` build for a 4-bit model: ``bitsandbytes.nn.Linear4bit``
(weight quantized by ``Params4bit`` on ``.to(device)``) wrapped by peft's ``lora.bnb.Linear4bit``
(peft picks it when the model says ``is_loaded_in_4bit``). Ours: ``cpm_live.layers.Linear4bit``
wrapped by ``cpm_live.lora``'s ``LoraQuantized``. Both quantize the same dense weight with the same
settings (nf4, double quant, blocksize 64), use r=8, alpha=16, and compute in the same dtype. A dense
``nn.Linear`` + peft LoRA is timed alongside as the no-quantization reference. The only math
difference is CPM-Bee's output scaling by 1/sqrt(dim_in) (one elementwise op). On CPU ours
dequantizes in plain torch (``cpm_live.quant.dequant``; bnb's native CPU kernel is wrong for some
shapes), so ``cpm_live_over_hf_bnb`` and ``dequantize_cpm_live_over_bnb`` are the price of that.
"""

from __future__ import annotations

import math
from typing import Any

import bench_common as bc
import torch
from torch import nn


class _Holder(nn.Module):
    """A one-projection model, so peft's injection (which targets named submodules) applies."""

    def __init__(self, proj: nn.Module, loaded_in_4bit: bool = False):
        super().__init__()
        self.proj = proj
        # transformers sets this on 4-bit models; peft then dispatches to its bnb LoRA layer.
        self.is_loaded_in_4bit = loaded_in_4bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_stacks(weight: torch.Tensor, compute_dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    """The three LoRA'd projections ``{"hf_bnb", "cpm_live", "dense"}`` of one ``[dim_out, dim_in]`` weight."""
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    from cpm_live.layers import Linear4bit
    from cpm_live.lora import LoraSettings, add_lora

    dim_out, dim_in = weight.shape
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"])

    hf = bnb.nn.Linear4bit(dim_in, dim_out, bias=False, compute_dtype=compute_dtype, compress_statistics=True,
                           quant_type="nf4", device="meta")
    hf.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True,
                                  quant_type="nf4", blocksize=64)
    hf_model = _Holder(hf.to(device), loaded_in_4bit=True)  # .to() quantizes (bnb's lifecycle)
    inject_adapter_in_model(peft_config, hf_model)

    ours = _Holder(Linear4bit.from_weight(weight, compute_dtype=compute_dtype, device=device))
    add_lora(ours, LoraSettings(targets=("proj",)))

    dense = nn.Linear(dim_in, dim_out, bias=False, device=device, dtype=compute_dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
    dense_model = _Holder(dense)
    inject_adapter_in_model(peft_config, dense_model)
    for model in (hf_model, dense_model):
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return {"hf_bnb": hf_model, "cpm_live": ours, "dense": dense_model}


def _fwd_bwd(model: nn.Module, x: torch.Tensor) -> None:
    model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    x.grad = None


def job_layers(spec: dict[str, Any]) -> dict[str, Any]:
    """Interleaved forward+backward times of the three stacks for each ``[dim_in, dim_out]`` shape."""
    import bitsandbytes.functional as bnbF

    from cpm_live.quant import dequant

    device = spec["device"]
    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    results = []
    for dim_in, dim_out in spec["shapes"]:
        weight = torch.randn(dim_out, dim_in, generator=g).to(device, compute_dtype)
        stacks = build_stacks(weight, compute_dtype, device)
        x = torch.randn(spec["tokens"], dim_in, generator=g).to(device, compute_dtype).requires_grad_()
        with torch.no_grad():  # same quantized base: ours * sqrt(dim_in) equals bnb's output
            hf_out = stacks["hf_bnb"](x).float()
            diff = (stacks["cpm_live"](x).float() * math.sqrt(dim_in) - hf_out).abs().max().item()

        times = bc.interleaved({name: (lambda m=m, x=x: _fwd_bwd(m, x)) for name, m in stacks.items()},
                               reps=spec["reps"], device=device, warmup=1)
        # The weight's dequantization alone: ours (exact torch on CPU, bnb's kernel on CUDA) vs bnb's.
        layer = stacks["cpm_live"].proj.get_base_layer()
        packed, state = layer.weight, layer.quant_state()
        deq = bc.interleaved({"cpm_live": lambda p=packed, s=state: dequant.dequantize_4bit(p, s),
                              "bnb": lambda p=packed, s=state: bnbF.dequantize_4bit(p, s)},
                             reps=spec["reps"], device=device, warmup=1)
        results.append({
            "dim_in": dim_in, "dim_out": dim_out, "tokens": spec["tokens"],
            "seconds_median": {k: bc.median(v) for k, v in times.items()},
            "seconds": times,
            "cpm_live_over_hf_bnb": bc.paired_ratio(times["cpm_live"], times["hf_bnb"]),
            "hf_bnb_over_dense": bc.paired_ratio(times["hf_bnb"], times["dense"]),
            "cpm_live_over_dense": bc.paired_ratio(times["cpm_live"], times["dense"]),
            "max_abs_diff_vs_hf": diff,
            "dequantize_seconds_median": {k: bc.median(v) for k, v in deq.items()},
            "dequantize_cpm_live_over_bnb": bc.paired_ratio(deq["cpm_live"], deq["bnb"]),
        })
    return {"compute_dtype": str(compute_dtype).removeprefix("torch."), "results": results}


def run_layers(shapes: list[tuple[int, int]], tokens: int, reps: int, device: str, threads: int) -> dict[str, Any]:
    out = bc.run_isolated(job_layers, {"shapes": [list(s) for s in shapes], "tokens": tokens, "reps": reps,
                                       "device": device, "threads": threads})
    out["stacks"] = {
        "hf_bnb": "bitsandbytes.nn.Linear4bit (Params4bit nf4, compress_statistics, blocksize 64) + "
                  "peft lora.bnb.Linear4bit via inject_adapter_in_model",
        "cpm_live": "cpm_live.layers.Linear4bit (nf4, double quant, blocksize 64) + cpm_live.lora.add_lora",
        "dense": "torch.nn.Linear (frozen) + peft lora.Linear",
    }
    return out
