"""An independent, deliberately naive CPM-Bee forward written straight from the spec (section 1).

It works on a plain state dict with Python loops for masks and buckets and divides ``q k^T`` by
``sqrt(dh)`` (the ``native_layers`` rounding), so agreement with ``cpm_live.models.CPMBee`` checks
the model's vectorised mask, bucket and scaling code against a second reading of the spec.
"""

from __future__ import annotations

import math

import torch


def _bucket(r: int, num_buckets: int = 256, max_distance: int = 2048) -> int:
    half = num_buckets // 2
    base = half if r > 0 else 0
    a = abs(r)
    max_exact = half // 2
    if a < max_exact:
        return base + a
    large = int(torch.log(torch.tensor(a, dtype=torch.float32) / max_exact).item()
                / math.log(max_distance / max_exact) * (half - max_exact))
    return base + min(half - 1, max_exact + large)


def _rms(x, w, eps=1e-6):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(var + eps)).to(x.dtype) * w


def _embed(weight, ids, subs):
    d = weight.size(1)
    x = weight[ids.long()] / math.sqrt(d)
    inv = (1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(x.dtype)
    ang = (subs.long() * 16)[..., None].to(x.dtype) * inv
    ang = torch.cat([ang, ang], -1)
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * ang.cos() + rot * ang.sin()


def reference_logits(sd: dict, cfg, batch: dict) -> torch.Tensor:
    inp, sub, length = batch["input"], batch["input_sub"], batch["length"]
    context, sample_ids, nseg = batch["context"].bool(), batch["sample_ids"], batch["num_segments"]
    segment, rel_off, span = batch["segment"], batch["segment_rel_offset"], batch["span"]
    seg_rel = batch["segment_rel"]
    B, L = inp.shape
    H, dh = cfg.num_heads, cfg.dim_head
    table = sd["position_bias.relative_attention_bias"]
    mask = torch.zeros(B, L, L, dtype=torch.bool)
    bias = torch.zeros(B, H, L, L, dtype=table.dtype)
    for b in range(B):
        for q in range(L):
            for k in range(L):
                same = bool(sample_ids[b, q] == sample_ids[b, k]) and bool(span[b, q] == span[b, k])
                if same:
                    idx = int(segment[b, q] * nseg[b, q] + segment[b, k] + rel_off[b, q])
                    rb = int(seg_rel[b, idx])
                else:
                    rb = 1
                row = _bucket(k - q) if rb == 0 else rb - 1 + cfg.position_bias_num_buckets
                bias[b, :, q, k] = table[row]
                ok = bool(context[b, k]) or (not bool(context[b, q]) and k <= q)
                ok = ok and (int(sample_ids[b, q]) == 0 or int(sample_ids[b, q]) == int(sample_ids[b, k]))
                ok = ok and bool(span[b, q] == span[b, k]) and q < int(length[b]) and k < int(length[b])
                mask[b, q, k] = ok
    E = sd["input_embedding.weight"]
    h = _embed(E, inp, sub)

    def lin(x, name):
        w = sd[name]
        return x @ w.t() / math.sqrt(w.size(1))

    for i in range(cfg.num_layers):
        p = f"encoder.layers.{i}."
        x = _rms(h, sd[p + "self_att.layernorm_before_attention.weight"])
        a = p + "self_att.self_attention."
        q = lin(x, a + "project_q.weight").view(B, L, H, dh).transpose(1, 2)
        k = lin(x, a + "project_k.weight").view(B, L, H, dh).transpose(1, 2)
        v = lin(x, a + "project_v.weight").view(B, L, H, dh).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(dh) + bias
        s = s.masked_fill(~mask[:, None], float("-inf")).softmax(-1).masked_fill(~mask[:, None], 0)
        o = (s @ v).transpose(1, 2).reshape(B, L, H * dh)
        h = (h + lin(o, a + "attention_out.weight")) / 1.05
        x = _rms(h, sd[p + "ffn.layernorm_before_ffn.weight"])
        f = p + "ffn.ffn."
        g = torch.nn.functional.gelu(lin(x, f + "w_in.w_0.weight")) * lin(x, f + "w_in.w_1.weight")
        h = (h + lin(g, f + "w_out.weight")) / 1.05
    h = _rms(h, sd["encoder.output_layernorm.weight"])
    ext = _embed(E, batch["ext_table_ids"], batch["ext_table_sub"])
    return torch.cat([(h / math.sqrt(E.size(1))) @ E.t(), h @ ext.t()], -1)
