import json
import math

import pytest
import torch

from cpm_live.engine import recompute_activations
from cpm_live.layers.position_embedding import position_bucket
from cpm_live.models import ConfigError, CPMBee, CPMBeeConfig
from tests.conftest import CONFIG_DIR
from tests.reference_cpmbee import reference_logits
from tests.tiny_models import packed_batch, run, tiny_config


def test_10b_key_table_and_parameter_count():
    config = CPMBeeConfig.from_json_file(CONFIG_DIR / "cpm-bee-10b.json")
    with torch.device("meta"):
        model = CPMBee(config)
    sd = model.state_dict()
    assert len(sd) == 435
    assert sum(v.numel() for v in sd.values()) == 9_616_080_896
    d, hd, ff = 4096, 32 * 128, 10240
    expected = {
        "input_embedding.weight": (86583, d),
        "position_bias.relative_attention_bias": (512, 32),
        "encoder.output_layernorm.weight": (d,),
    }
    for n in range(48):
        p = f"encoder.layers.{n}."
        expected.update({
            p + "self_att.layernorm_before_attention.weight": (d,),
            p + "self_att.self_attention.project_q.weight": (hd, d),
            p + "self_att.self_attention.project_k.weight": (hd, d),
            p + "self_att.self_attention.project_v.weight": (hd, d),
            p + "self_att.self_attention.attention_out.weight": (d, hd),
            p + "ffn.layernorm_before_ffn.weight": (d,),
            p + "ffn.ffn.w_in.w_0.weight": (ff, d),
            p + "ffn.ffn.w_in.w_1.weight": (ff, d),
            p + "ffn.ffn.w_out.weight": (d, ff),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float16 for v in sd.values())


def test_position_buckets_match_spec_examples():
    r = torch.tensor([-1, -64, -100, -1000, -2047, -5000, 1, 64, 2048, 0])
    assert position_bucket(r).tolist() == [1, 64, 72, 114, 127, 127, 129, 192, 255, 0]


def test_forward_matches_independent_reference_fp32():
    config = tiny_config()
    torch.manual_seed(0)
    model = CPMBee(config).eval()
    batch = packed_batch(config.vocab_size)
    logits = run(model, batch)
    assert logits.shape == (2, 12, config.vocab_size + 2)
    ref = reference_logits(model.state_dict(), config, batch)
    valid = torch.arange(12)[None, :] < batch["length"][:, None]
    rel = ((logits - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, rel
    assert torch.allclose(logits[valid], ref[valid], rtol=1e-4, atol=1e-5)


def test_forward_is_deterministic():
    config = tiny_config()
    torch.manual_seed(1)
    model = CPMBee(config).eval()
    batch = packed_batch(config.vocab_size, seed=3)
    assert torch.equal(run(model, batch), run(model, batch))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)], ids=["fp16", "bf16"])
def test_low_precision_forward_agrees_with_fp32(dtype, tol):
    config = tiny_config()
    torch.manual_seed(2)
    model = CPMBee(config).eval()
    batch = packed_batch(config.vocab_size, seed=5)
    ref = run(model, batch)
    low = run(model.to(dtype), batch).float()
    rel = ((low - ref).norm() / ref.norm()).item()
    assert rel < tol, f"{dtype}: relative L2 error {rel:.3e}"


def test_half_config_builds_fp16_weights():
    model = CPMBee(tiny_config(half=True))
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_incremental_inference_equals_full_forward():
    config = tiny_config()
    torch.manual_seed(4)
    model = CPMBee(config).eval()
    L, P = 10, 6  # P context tokens, then L - P predicted tokens fed one at a time
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(11, config.vocab_size, (1, L), generator=g, dtype=torch.int32)
    zeros = torch.zeros(1, L, dtype=torch.int32)
    context = torch.tensor([[1] * P + [0] * (L - P)], dtype=torch.bool)
    segment = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 2, 2]], dtype=torch.int32)
    nseg = torch.full((1, L), 3, dtype=torch.int32)
    seg_rel = torch.tensor([[0, 2, 3, 9, 0, 2, 17, 9, 0]], dtype=torch.int32)
    ext_ids, ext_sub = torch.tensor([1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    full = model(ids, zeros, torch.tensor([L], dtype=torch.int32), context, zeros, nseg, segment, zeros,
                 seg_rel, zeros, ext_ids, ext_sub)[0]
    position = torch.arange(L, dtype=torch.int32)[None]
    sl = slice(0, P)
    logits, _, state = model.inference(ids[:, sl], zeros[:, sl], position[:, sl], context[:, sl],
                                       zeros[:, sl], nseg[:, sl], segment[:, sl], zeros[:, sl], seg_rel,
                                       ext_ids, ext_sub)
    steps = [logits]
    for t in range(P, L):
        sl = slice(t, t + 1)
        logits, _, state = model.inference(ids[:, sl], zeros[:, sl], position[:, sl], context[:, sl],
                                           zeros[:, sl], nseg[:, sl], segment[:, sl], zeros[:, sl], seg_rel,
                                           ext_ids, ext_sub, past_key_values=state)
        steps.append(logits)
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)
    assert state["buffer"][0][0].shape == (1, config.num_heads, L, config.dim_head)


def test_mask_modules_skip_sub_blocks():
    config = tiny_config(mask_modules=[[True, False], [False, True]])
    model = CPMBee(config)
    keys = set(model.state_dict())
    assert not any(k.startswith("encoder.layers.0.self_att") for k in keys)
    assert not any(k.startswith("encoder.layers.1.ffn") for k in keys)
    assert "encoder.layers.0.ffn.ffn.w_out.weight" in keys
    batch = packed_batch(config.vocab_size)
    assert torch.isfinite(run(model.eval(), batch)).all()
    with pytest.raises(ConfigError, match="mask_modules has 1 entries"):
        tiny_config(mask_modules=[[True, False]])


def test_activation_checkpointing_gives_same_gradients():
    config = tiny_config()
    torch.manual_seed(5)
    model = CPMBee(config)
    batch = packed_batch(config.vocab_size)

    def grads():
        model.zero_grad()
        run(model, batch).float().pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    def saved_count():
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(model, batch)
        return count[0]

    plain, plain_saved = grads(), saved_count()
    recompute_activations(model.encoder.layers)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)
    assert saved_count() < plain_saved / 2  # the blocks' activations are recomputed, not stored


def test_strict_load_of_original_key_layout(tmp_path):
    config = tiny_config()
    torch.manual_seed(6)
    source = CPMBee(config)
    path = tmp_path / "original.pt"
    torch.save(dict(source.state_dict()), path)  # what bmt.save writes: a flat dict of tensors
    target = CPMBee(config)
    target.load_state_dict(torch.load(path, weights_only=True), strict=True)
    batch = packed_batch(config.vocab_size)
    assert torch.equal(run(source.eval(), batch), run(target.eval(), batch))


def test_config_json_round_trip(tmp_path):
    config = CPMBeeConfig.from_json_file(CONFIG_DIR / "cpm-bee-10b.json", int4=True)
    path = tmp_path / "c.json"
    config.to_json_file(path)
    again = CPMBeeConfig.from_json_file(path)
    assert again == config and again.int4 and again.dtype == torch.float16
    assert json.loads(path.read_text())["vocab_size"] == 86583


def test_original_defaults():
    c = CPMBeeConfig()
    assert (c.vocab_size, c.dim_model, c.num_heads, c.dim_head, c.dim_ff, c.num_layers) == \
        (30720, 4096, 64, 64, 10240, 32)
    assert (c.position_bias_num_buckets, c.position_bias_max_distance, c.eps) == (256, 2048, 1e-6)
    assert c.int4 is False and c.int4_quant_type == "nf4" and c.int4_double_quant and c.int4_blocksize == 64


def test_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vocab_size": 10, "dim_modle": 8}))
    with pytest.raises(ConfigError, match=r"\['dim_modle'\].*bad\.json"):
        CPMBeeConfig.from_json_file(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json:1: not valid JSON"):
        CPMBeeConfig.from_json_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        CPMBeeConfig.from_json_file(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="int4_quant_type"):
        tiny_config(int4_quant_type="int8")


def test_linear_scaling():
    from cpm_live.layers import Linear

    lin = Linear(16, 4, dtype=torch.float32)
    x = torch.randn(3, 16)
    torch.testing.assert_close(lin(x), x @ lin.weight.t() / math.sqrt(16))
