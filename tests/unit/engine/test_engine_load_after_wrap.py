"""Which keys a BMTrain-wrapped model loads: the float parameters outside the 4-bit/int8 layers.

BMTrain needs CUDA, but the rule its ``load_state_dict`` applies (``float_parameters_outside_quantized_layers``
with ``check_state_dict_keys``) is plain torch and checked here on the models tests/gpu loads into it:
tests/dist_scripts/engine_checks.py's int4 model (double quant on and off) and int8_checks.py's int8 + LoRA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cpm_live.engine import EngineError
from cpm_live.engine.base import check_state_dict_keys, float_parameters_outside_quantized_layers
from cpm_live.layers import Linear4bit, Linear8bit
from cpm_live.models import CPMBee
from tests.dist_scripts import engine_checks, int8_checks


def quantized_prefixes(model: torch.nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bit))]


def int4_model(double_quant: bool) -> CPMBee:
    model = engine_checks.build_model(seed=0)
    if double_quant:
        return model
    torch.manual_seed(0)
    return CPMBee(dataclasses.replace(model.config, int4_double_quant=False))


MODELS = {"int4": lambda: int4_model(True), "int4-no-double-quant": lambda: int4_model(False),
          "int8-lora": lambda: int8_checks.build_model(seed=0)}


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_the_loadable_names_are_every_float_state_key_outside_quantized_layers(build):
    model = build()
    loadable = float_parameters_outside_quantized_layers(model)
    state = model.state_dict()
    prefixes = quantized_prefixes(model)
    assert prefixes and loadable
    expected = [k for k, v in state.items() if v.is_floating_point() and not k.startswith(tuple(prefixes))]
    assert sorted(loadable) == sorted(expected)
    # every quantized layer holds float statistics that are not asked for after wrap
    floats_inside = [n for n, p in model.named_parameters() if p.is_floating_point() and n.startswith(tuple(prefixes))]
    assert floats_inside and not set(floats_inside) & set(loadable)


def test_engine_checks_float_dict_loads_strictly_and_the_full_dict_is_refused():
    """What tests/gpu/test_engines_gpu.py's bmtrain runs do after wrap (engine_checks.train_phase)."""
    reference = engine_checks.build_model(seed=1)
    state = reference.state_dict()
    names = {n for n, p in reference.named_parameters() if p.is_floating_point()}
    float_only = {k: v for k, v in state.items() if k in names}
    model = engine_checks.build_model(seed=0)
    loadable = float_parameters_outside_quantized_layers(model)
    check_state_dict_keys(float_only, loadable, strict=True)  # nothing missing, nothing unknown
    with pytest.raises(EngineError, match="not in the model"):
        check_state_dict_keys(state, loadable, strict=True)


def test_a_lora_only_dict_loads_without_strict():
    """Resuming a QLoRA run loads the trainable (LoRA) tensors alone (training/loop.py, strict=False)."""
    model = int8_checks.build_model(seed=0)
    lora = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    loadable = float_parameters_outside_quantized_layers(model)
    assert lora and set(lora) <= set(loadable)
    check_state_dict_keys(lora, loadable, strict=False)
    with pytest.raises(EngineError, match="missing from the checkpoint"):
        check_state_dict_keys(lora, loadable, strict=True)
