"""Engine choice, options, and the torch engine in one process (no process group): optimizer with
fp32 masters, loss scaling, clipping, state dicts, training state, inspection."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpm_live.engine import EngineError, add_engine_args, factory, format_summary, get_engine, inspect_model
from cpm_live.engine.loss_scale import DynamicLossScaler
from cpm_live.layers import Linear4bit
from tests.dist_scripts import engine_checks as checks


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)


class Toy(nn.Module):
    """Two trainable tensors of a chosen dtype and a frozen uint8 one (like packed 4-bit codes)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-1, 1, 8, dtype=dtype))
        self.b = nn.Parameter(torch.full((3,), 0.5, dtype=dtype))
        self.codes = nn.Parameter(torch.arange(6, dtype=torch.uint8), requires_grad=False)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a.float() * x).pow(2).sum() + self.b.float().sum() * x.sum()


def engine(**kwargs):
    return get_engine("torch", device="cpu", **kwargs)


# ---------------------------------------------------------------------- choosing an engine
def test_unknown_engine_name_is_rejected_with_the_choices():
    with pytest.raises(EngineError, match="unknown engine 'deepspeed'.*auto, torch, bmtrain"):
        get_engine("deepspeed")


def test_bmtrain_without_cuda_points_to_the_torch_engine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineError, match="needs a CUDA GPU.*`engine` torch"):
        get_engine("bmtrain")
    with pytest.raises(EngineError, match="CUDA only.*`device` cpu"):
        get_engine("bmtrain", device="cpu")


def test_bmtrain_not_installed_says_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bmtrain", None)  # makes `import bmtrain` raise ImportError
    monkeypatch.delitem(sys.modules, "cpm_live.engine.bmtrain_engine", raising=False)
    with pytest.raises(EngineError, match=r"pip install 'cpm_live\[gpu\]'.*`engine` torch"):
        get_engine("bmtrain")


@pytest.mark.parametrize("cuda, installed, device, expected", [
    (False, True, "auto", "torch"),
    (True, False, "auto", "torch"),
    (True, True, "auto", "bmtrain"),
    (True, True, "cpu", "torch"),
], ids=["no-cuda", "no-bmtrain", "cuda+bmtrain", "forced-cpu"])
def test_auto_picks_bmtrain_only_with_cuda_and_bmtrain(monkeypatch, cuda, installed, device, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(factory.importlib.util, "find_spec", lambda name: object() if installed else None)
    assert factory.resolve_engine_name("auto", device) == expected


def test_engine_args_keep_the_original_defaults():
    parser = add_engine_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.engine, args.seed, args.loss_scale, args.loss_scale_factor, args.loss_scale_steps,
            args.dist_timeout) == ("auto", 1234, 1048576.0, 2.0, 512, 1800.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--engine", "horovod"])


def test_single_process_engine_has_no_process_group():
    e = engine()
    assert (e.rank, e.world_size, e.local_rank, e.is_main, e.device.type) == (0, 1, 0, True, "cpu")
    assert not torch.distributed.is_initialized()
    assert e.all_gather_object({"x": 1}) == [{"x": 1}]
    assert e.all_reduce_sum(2.5) == 2.5
    torch.testing.assert_close(e.all_reduce_mean(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 3.0]))
    e.check_consistent({"dim_model": 64}, "model config")
    e.barrier()
    e.close()


def test_loss_scaler_rejects_bad_settings():
    with pytest.raises(ValueError, match="`loss_scale_factor` must be > 1"):
        DynamicLossScaler(1024, factor=1.0)
    with pytest.raises(ValueError, match="`loss_scale_steps`"):
        DynamicLossScaler(1024, window=0)


# ---------------------------------------------------------------------- optimizer and scaling
def test_optimizer_needs_a_wrapped_model_and_something_to_train():
    e = engine()
    toy = Toy()
    with pytest.raises(EngineError, match="before engine.optimizer"):
        e.optimizer(toy.parameters(), lr=0.1)
    toy = e.wrap(toy)
    toy.requires_grad_(False)
    with pytest.raises(EngineError, match="no trainable parameters"):
        e.optimizer(toy.parameters(), lr=0.1)


def test_fp32_training_is_plain_adamw_and_never_scales_the_loss():
    e = engine(loss_scale=1024, loss_scale_steps=1)
    toy = e.wrap(Toy())
    ref = Toy()
    opt = e.optimizer(toy.parameters(), lr=0.1, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref.a, ref.b], lr=0.1, weight_decay=0.1)
    for step in range(4):
        x = torch.randn(8, generator=torch.Generator().manual_seed(step))
        e.backward(toy.loss(x))
        assert e.step(opt)
        e.zero_grad(opt)
        ref.loss(x).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert e.loss_scale == 1.0  # the original let an unused scale double every N steps
    torch.testing.assert_close(toy.a.detach(), ref.a.detach())
    torch.testing.assert_close(toy.b.detach(), ref.b.detach())
    assert toy.codes.dtype == torch.uint8 and toy.a.grad is None


def test_fp16_parameters_train_through_fp32_masters():
    # Adam moves each weight by ~lr per step; 1e-4 is below fp16's spacing at 1.0 (~1e-3), so
    # Adam run on the fp16 values would never move them. The fp32 master accumulates it.
    e = engine(loss_scale=256)
    toy = e.wrap(Toy(torch.float16))
    opt = e.optimizer(toy.parameters(), lr=1e-4)
    assert e.loss_scale == 256.0
    for _ in range(20):
        e.backward(toy.b.float().sum())  # constant gradient 1
        assert e.step(opt)
        e.zero_grad(opt)
    master = opt.masters[1]
    assert master.dtype == torch.float32 and toy.b.dtype == torch.float16
    torch.testing.assert_close(master, torch.full((3,), 0.5 - 20e-4), rtol=0, atol=1e-6)
    assert float(toy.b.detach()[0]) < 0.5  # the fp16 weight follows its master


def test_loss_scale_is_unscaled_before_the_update():
    scaled, plain = engine(loss_scale=2.0**12), engine()
    results = []
    for e in (scaled, plain):
        toy = e.wrap(Toy(torch.float16))
        if e is plain:
            toy.a.data = toy.a.data.float()  # same values, fp32: no scaling
            toy.b.data = toy.b.data.float()
        opt = e.optimizer(toy.parameters(), lr=0.1)
        e.backward(toy.loss(torch.linspace(0, 1, 8)))
        norm = e.clip_grad_norm(float("inf"))
        e.step(opt)
        results.append((norm, opt.masters[0].detach().clone()))
    assert scaled.loss_scale == 2.0**12 and plain.loss_scale == 1.0
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-3, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-4)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale_then_grows_it_back():
    e = engine(loss_scale=1024, loss_scale_factor=2, loss_scale_steps=2)
    toy = e.wrap(Toy(torch.float16))
    opt = e.optimizer(toy.parameters(), lr=0.1)
    before = toy.a.detach().clone()
    e.backward(toy.loss(torch.ones(8)))
    toy.a.grad[3] = float("inf")
    assert e.clip_grad_norm(1.0) == float("inf")
    assert not e.step(opt)
    assert e.loss_scale == 512.0
    assert torch.equal(toy.a.detach(), before) and toy.a.grad is None
    for _ in range(2):
        e.backward(toy.loss(torch.ones(8)))
        assert e.step(opt)
        e.zero_grad(opt)
    assert e.loss_scale == 1024.0


def test_clip_grad_norm_is_the_global_unscaled_norm_and_clips_like_torch():
    e = engine(loss_scale=64)
    toy = e.wrap(Toy(torch.float16))
    ref = Toy()
    e.optimizer(toy.parameters(), lr=0.1)
    x = torch.linspace(-2, 2, 8)
    e.backward(toy.loss(x))
    ref.loss(x).backward()
    norm = e.clip_grad_norm(0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_([ref.a, ref.b], 0.5)
    torch.testing.assert_close(norm, float(ref_norm), rtol=2e-3, atol=0)
    torch.testing.assert_close(toy.a.grad.float() / e.loss_scale, ref.a.grad, rtol=2e-3, atol=1e-4)


def test_cross_entropy_is_the_mean_over_labelled_tokens():
    e = engine()
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, -100, 4], [-100, -100, 0]])
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(e.cross_entropy(logits.half(), targets), expected, rtol=1e-3, atol=1e-3)
    nothing = e.cross_entropy(logits.requires_grad_(), torch.full((2, 3), -100))
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad  # not NaN, and still backpropagates


# ---------------------------------------------------------------------- checkpoints
def test_state_dicts_trainable_only_and_key_checks():
    e = engine()
    toy = e.wrap(Toy())
    assert set(e.state_dict(toy)) == {"a", "b", "codes"}
    toy.b.requires_grad_(False)
    trainable = e.state_dict(toy, trainable_only=True)
    assert set(trainable) == {"a"}
    trainable["a"] += 1  # a copy, not the live parameter
    assert not torch.equal(toy.a.detach(), trainable["a"])
    e.load_state_dict(toy, trainable, strict=False)
    assert torch.equal(toy.a.detach(), trainable["a"])
    with pytest.raises(EngineError, match=r"missing from the checkpoint \(2\): b; codes"):
        e.load_state_dict(toy, trainable, strict=True)
    with pytest.raises(EngineError, match=r"not in the model \(1\): lora_A.weight"):
        e.load_state_dict(toy, {"a": trainable["a"], "lora_A.weight": torch.zeros(1)}, strict=False)


def test_training_state_resumes_exactly():
    def run(steps: int, resume_from=None):
        e = engine(loss_scale=128)
        toy = e.wrap(Toy(torch.float16))
        opt = e.optimizer(toy.parameters(), lr=0.05, weight_decay=0.1)
        if resume_from is not None:
            weights, state = resume_from
            e.load_state_dict(toy, weights)
            e.load_training_state(opt, state)
        for step in steps:
            e.backward(toy.loss(torch.randn(8, generator=torch.Generator().manual_seed(step))))
            e.step(opt)
            e.zero_grad(opt)
        return e, toy, opt

    _, straight, _ = run(range(6))
    e, half, opt = run(range(3))
    saved = (e.state_dict(half), e.training_state(opt))
    assert saved[1]["scaler"]["scale"] == 128.0 and "master" in saved[1]["params"]["a"]
    _, resumed, _ = run(range(3, 6), resume_from=saved)
    assert torch.equal(resumed.a.detach(), straight.a.detach())
    assert torch.equal(resumed.b.detach(), straight.b.detach())


def test_training_state_of_another_engine_is_refused():
    e = engine()
    opt = e.optimizer(e.wrap(Toy()).parameters(), lr=0.1)
    with pytest.raises(EngineError, match="written by engine 'bmtrain'"):
        e.load_training_state(opt, {"engine": "bmtrain"})


# ---------------------------------------------------------------------- inspection
def test_inspect_model_summarises_integer_tensors_without_statistics():
    model = checks.build_model(seed=0)
    logits = checks.logits_of(model, checks.make_batch(seed=1), torch.device("cpu"))
    logits.float().pow(2).mean().backward()
    rows = {r["name"]: r for r in inspect_model(model)}
    packed = rows["encoder.layers.0.self_att.self_attention.project_q.weight"]
    assert packed["dtype"] == "uint8" and packed["bytes"] == packed["numel"] == 64 * 64 // 2
    assert all(packed[k] is None for k in ("min", "max", "mean", "std", "grad_mean", "grad_std"))
    emb = rows["input_embedding.weight"]
    w = model.input_embedding.weight
    torch.testing.assert_close(emb["std"], float(w.std()), rtol=1e-6, atol=0)
    assert (emb["min"], emb["max"]) == (float(w.min()), float(w.max()))
    assert emb["grad_mean"] is None  # frozen: no gradient
    norm = rows["encoder.output_layernorm.weight"]
    torch.testing.assert_close(norm["grad_std"], float(model.encoder.output_layernorm.weight.grad.std()))
    assert len(inspect_model(model, "*weight_absmax")) == 14
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    table = format_summary(list(rows.values()))
    assert "project_q.weight" in table and "uint8" in table


def test_cpm_bee_blocks_keep_the_block_contract_engines_rely_on():
    """``Engine.wrap``'s block contract (the bmtrain adapter calls blocks by it; bmtrain is GPU-only)."""
    import inspect

    from cpm_live.layers.blocks import TransformerBlock
    from cpm_live.models import CPMBee, CPMBeeConfig

    params = list(inspect.signature(TransformerBlock.forward).parameters.values())[1:]
    assert [p.name for p in params] == ["h", "attention_mask", "position_bias", "past_kv", "use_cache"]
    assert [p.default for p in params[3:]] == [None, False]
    torch.manual_seed(0)
    model = CPMBee(CPMBeeConfig(vocab_size=64, dim_model=32, dim_ff=48, num_layers=2, num_heads=2, dim_head=16,
                                half=False))
    for block in model.encoder.layers:
        assert not list(block.parameters(recurse=False)) and not list(block.buffers(recurse=False))
    h = torch.randn(1, 3, 32)
    mask = torch.ones(1, 3, 3, dtype=torch.bool)
    bias = torch.zeros(1, 2, 3, 3)
    out, kv = model.encoder.layers[0](h, mask, bias)
    assert out.shape == h.shape and kv is None  # no cache unless asked
    out_cached, kv = model.encoder.layers[0](h, mask, bias, None, True)
    assert torch.equal(out_cached, out) and kv is not None
