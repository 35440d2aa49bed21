"""CPM-Bee-10B: estimated peak GPU memory of a QLoRA step vs bf16 LoRA, and (on CUDA) the measured one.

The estimate needs no GPU. The model is built on the meta device (exact parameter bytes, the 4-bit
state included) and one forward runs there under ``saved_tensors_hooks``, which records every tensor
autograd keeps for backward, split into "inside block i" and "outside any block". Meta tensors would
take torch's math attention kernel, which keeps the (B, H, T, T) probabilities; the kernels that run
on a GPU (cuDNN, memory-efficient) and on a CPU (flash) keep q, k, v, the output and a (B, H, T)
log-sum-exp instead, so attention is counted as they keep it. With activation checkpointing a block
keeps only its input until backward recomputes it, so:

    resident   = weights + LoRA (fp32 param, grad, Adam m and v) + block inputs (layers x T x d)
                 + the additive attention mask (B, H, T, T), built once and shared by every layer
                 + tensors saved outside blocks
    peak       = resident + max(one block's saved tensors + its backward transients,
                                the loss: one chunk of logits at a time)

Backward transients of a block are taken as two copies of its largest saved tensor plus the largest
dequantized weight. The loss never holds the (T, V) logits: it takes a chunk of rows at a time
(``layers.projection_loss``), so its working set is one chunk's logits in the activation dtype,
which its gradient overwrites (the fp32 softmax is formed a few rows at a time). This is an
estimate with its assumptions in the JSON; ``--device cuda`` measures the real step.
"""

from __future__ import annotations

from typing import Any

import bench_common as bc
import torch
import torch.nn.functional as F

from cpm_live.layers.projection_loss import CHUNK_LOGITS

CONFIG_PATH = bc.REPO_ROOT / "src" / "config" / "cpm-bee-10b.json"
GIB = 2**30


def build_10b(mode: str, device: str, dtype: torch.dtype = torch.bfloat16, config_path=CONFIG_PATH,
              recompute: bool = True):
    """The CPM-Bee-10B model as trained here: ``qlora`` (nf4 base, ``dtype`` compute and other weights)
    or ``lora_bf16`` (``dtype`` base), both with CPM-Bee's LoRA (r=8, q and v); activation checkpointing
    on. ``dtype`` is bf16 on CUDA, fp32 on a CPU without native bf16 (``scale_10b``)."""
    from cpm_live.engine import recompute_activations
    from cpm_live.lora import LoraSettings, add_lora
    from cpm_live.models import CPMBee, CPMBeeConfig

    if mode not in ("qlora", "lora_bf16"):
        raise ValueError(f"10B mode must be qlora or lora_bf16, got {mode!r}")
    config = CPMBeeConfig.from_json_file(config_path, int4=mode == "qlora",
                                         int4_compute_dtype=str(dtype).removeprefix("torch."))
    with torch.device(device):
        model = CPMBee(config)
    bc.cast_floating(model, dtype)
    add_lora(model, LoraSettings())
    if recompute:
        recompute_activations(model.encoder.layers)
    model.train()
    return model, config


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for the fused SDPA kernels: keeps for backward what they keep (q, k, v,
    the output and an fp32 (B, H, Lq) log-sum-exp; the mask is the shared resident one)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


def _fused_sdpa(q, k, v, attn_mask=None, **_):
    return _FusedAttention.apply(q, k, v)


def saved_tensor_bytes(model: torch.nn.Module, config, tokens: int) -> dict[str, Any]:
    """Bytes autograd saves per block and outside blocks for one forward (no checkpointing).

    The forward runs without targets (selecting the labelled rows has no shape-only version): the
    output projection's saved input, one (T, d) tensor, stands for the loss's two (N, d) gradients.
    """
    from cpm_live.layers.blocks import TransformerBlock

    own = {p.untyped_storage()._cdata for p in list(model.parameters()) + list(model.buffers())}
    scope = ["outside"]
    saved: dict[str, dict[int, int]] = {"outside": {}}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in own and not any(key in s for s in saved.values()):
            saved.setdefault(scope[-1], {})[key] = t.untyped_storage().nbytes()
        return t

    def leave(*_) -> None:  # a forward hook that returned a value would replace the block's output
        scope.pop()

    handles = []
    for i, block in enumerate(m for m in model.modules() if isinstance(m, TransformerBlock)):
        handles.append(block.register_forward_pre_hook(lambda *_, i=i: scope.append(f"block{i}")))
        handles.append(block.register_forward_hook(leave))
    batch, _ = bc.make_batch(1, tokens, config.vocab_size, "meta")
    sdpa = F.scaled_dot_product_attention
    try:  # this job's process only; restored even on error
        F.scaled_dot_product_attention = _fused_sdpa
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch.forward_kwargs())
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    blocks = [v for k, v in saved.items() if k != "outside"]
    return {
        "outside_blocks": sum(saved["outside"].values()),
        "per_block_max": max(sum(b.values()) for b in blocks),
        "largest_in_block": max(max(b.values()) for b in blocks),
    }


def estimate(mode: str, tokens: int = 2048, dtype: torch.dtype = torch.bfloat16, config_path=CONFIG_PATH
             ) -> dict[str, Any]:
    """Estimated peak bytes of one training step of ``mode`` at batch 1 x ``tokens``, ``dtype`` activations."""
    from cpm_live.layers import Linear4bit

    model, config = build_10b(mode, "meta", dtype, config_path, recompute=False)  # saved tensors counted without it
    weights = sum(_nbytes(t) for t in list(model.parameters()) + list(model.buffers()))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = saved_tensor_bytes(model, config, tokens)
    act_bytes = dtype.itemsize
    heads_tt = config.num_heads * tokens * tokens * act_bytes  # one (1, H, T, T) tensor
    largest_weight = max((m.dim_in * m.dim_out * act_bytes for m in model.modules() if isinstance(m, Linear4bit)),
                         default=0)
    parts = {
        "weights": weights,
        "lora_param_grad_adam": lora_params * (4 + 4 + 8),
        "checkpointed_block_inputs": config.num_layers * tokens * config.dim_model * act_bytes,
        "attention_mask": heads_tt,  # the bias table is frozen in both modes: no gradient of it
        "bool_mask": tokens * tokens,
        "saved_outside_blocks": saved["outside_blocks"],
    }
    block_phase = saved["per_block_max"] + 2 * saved["largest_in_block"] + largest_weight
    # The loss: one chunk of logits in the activation dtype, overwritten by their gradient.
    loss_phase = CHUNK_LOGITS * act_bytes
    resident = sum(parts.values())
    peak = resident + max(block_phase, loss_phase)
    return {
        "mode": mode, "tokens": tokens, "batch": 1, "activation_checkpointing": True,
        "dtype": str(dtype).removeprefix("torch."),
        "lora_params": lora_params,
        "parts_gib": {k: v / GIB for k, v in parts.items()},
        "one_block_recompute_gib": block_phase / GIB, "loss_gib": loss_phase / GIB,
        "estimated_peak_gib": peak / GIB,
    }


def run_estimate(tokens: int = 2048) -> dict[str, Any]:
    """Both modes, the weight-byte breakdown and the verdict against the 12 GiB target."""
    from cpm_live.quant import format as qformat

    qlora, lora = bc.run_isolated(job_estimate, {"tokens": tokens})
    settings = qformat.QuantSettings()
    bpp = qformat.quantized_bytes((4096, 10240), settings) / (4096 * 10240)
    return {
        "config": "src/config/cpm-bee-10b.json", "linear_bytes_per_param": bpp,
        "qlora": qlora, "lora_bf16": lora,
        "qlora_over_lora_peak": qlora["estimated_peak_gib"] / lora["estimated_peak_gib"],
        "target_gib": 12.0, "qlora_under_target": qlora["estimated_peak_gib"] < 12.0,
        "assumptions": [
            "bf16 activations and non-quantized weights; LoRA r=8 on project_q/project_v in fp32 with fp32 "
            "grads and AdamW m, v",
            "activation checkpointing per block: each block keeps its input; one block is recomputed at a time",
            "attention keeps what the fused kernels keep (q, k, v, output, log-sum-exp); one additive mask "
            "(1, H, T, T) in the activation dtype is shared by every layer",
            "the loss holds one chunk of logits at a time (layers.projection_loss.CHUNK_LOGITS)",
            "block backward transients = 2 x its largest saved tensor + the largest dequantized weight",
            "torch.cuda.max_memory_allocated scope: the CUDA context (~0.5 GiB) and allocator slack are not "
            "included",
        ],
    }


def job_estimate(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [estimate("qlora", spec["tokens"]), estimate("lora_bf16", spec["tokens"])]


def job_measure_10b(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory and step times of one mode in a fresh process: on CUDA the allocator's peak, on CPU
    (only the tiny config of the dry run) the RSS high-water mark. The peak counts from after the model
    is built, so building (on CUDA: each 4-bit weight quantized there from a random fp16 tensor) is
    not charged."""
    device = spec["device"]
    model, config = build_10b(spec["mode"], device, config_path=spec["config_path"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch, target = bc.make_batch(1, spec["tokens"], config.vocab_size, device)
    if device == "cuda":
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        resident = bc.rss_bytes()[0]
        bc.reset_peak_rss()
    times = bc.interleaved({"step": lambda: bc.train_step(model, optimizer, batch, target)},
                           reps=spec["steps"], device=device, warmup=1)["step"]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else bc.rss_bytes()[1]
    return {"mode": spec["mode"], "tokens": spec["tokens"], "peak_gib": peak / GIB,
            "weights_and_state_gib": resident / GIB, "step_s": times, "step_s_median": bc.median(times),
            "tokens_per_s": spec["tokens"] / bc.median(times)}


def job_interleave_10b(spec: dict[str, Any]) -> dict[str, Any]:
    """CUDA: both modes resident in one process, steps interleaved (None if they do not fit together)."""
    steps = {}
    try:
        for mode in ("qlora", "lora_bf16"):
            model, config = build_10b(mode, "cuda", config_path=spec["config_path"])
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            batch, target = bc.make_batch(1, spec["tokens"], config.vocab_size, "cuda")
            steps[mode] = (lambda m=model, o=optimizer, b=batch, t=target: bc.train_step(m, o, b, t))
        times = bc.interleaved(steps, reps=spec["steps"], device="cuda", warmup=1)
    except torch.cuda.OutOfMemoryError as e:
        return {"interleaved": None, "reason": f"both models do not fit on one GPU: {e}".splitlines()[0]}
    return {"interleaved": times, "qlora_over_lora_time": bc.paired_ratio(times["qlora"], times["lora_bf16"])}


def run_measured_10b(tokens: int = 2048, steps: int = 3, modes: tuple[str, ...] = ("qlora", "lora_bf16"),
                     config_path=CONFIG_PATH, device: str = "cuda", log=print) -> dict[str, Any]:
    """The measured run: each mode's peak and step time in its own process, next to :func:`estimate` for
    the same mode, tokens and bf16; with both modes, their steps interleaved for the time ratio."""
    spec = {"tokens": tokens, "steps": steps, "config_path": str(config_path), "device": device}
    out: dict[str, Any] = {"config": str(config_path), "device": device, "tokens": tokens, "batch": 1,
                           "peak_method": "torch.cuda.max_memory_allocated" if device == "cuda" else
                           "RSS high-water mark (interpreter and libraries included: not comparable with the "
                           "estimate, which counts tensors)",
                           "activation_checkpointing": True, "weights": "random, each 4-bit weight quantized "
                           "on the device from a random fp16 tensor as the model is built (no checkpoint file)"}
    for mode in modes:
        try:
            out[mode] = bc.run_isolated(job_measure_10b, {**spec, "mode": mode})
        except RuntimeError as e:  # e.g. bf16 LoRA of 10B does not fit a 24 GB GPU
            out[mode] = {"error": str(e).splitlines()[-1]}
        est = estimate(mode, tokens, torch.bfloat16, config_path)["estimated_peak_gib"]
        out[mode]["estimated_peak_gib"] = est
        if "peak_gib" in out[mode]:
            out[mode]["peak_over_estimate"] = out[mode]["peak_gib"] / est
        log(f"  10B {mode}: {out[mode]}")
    if "qlora" in modes and "lora_bf16" in modes:
        try:
            out.update(bc.run_isolated(job_interleave_10b, spec))
        except RuntimeError as e:
            out["interleaved"] = {"error": str(e).splitlines()[-1]}
        if "peak_gib" in out["qlora"] and "peak_gib" in out["lora_bf16"]:
            out["qlora_over_lora_peak"] = out["qlora"]["peak_gib"] / out["lora_bf16"]["peak_gib"]
    if "peak_gib" in out.get("qlora", {}):
        out["qlora_under_12_gib"] = out["qlora"]["peak_gib"] < 12.0
    return out
