"""A trained adapter loads with plain ``peft.PeftModel.from_pretrained`` on the model this package builds
(dense, 4-bit and 8-bit bases) and gives the logits of this package's own loader."""

import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from cpm_live.checkpoint.adapters import load_adapter, save_adapter
from cpm_live.lora import LoraSettings, add_lora
from cpm_live.lora.inject import lora_state_dict
from tests.tiny_models import packed_batch, run, tiny_config

BASES = {
    "dense": {},
    "int4": {"int4": True, "int4_compute_dtype": "float32"},
    "int8": {"int8": True},
}


def train_adapter(model, steps: int = 3) -> None:
    """A few real AdamW steps on the LoRA weights (B = 0 at init would make the comparison vacuous)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    batch = packed_batch(model.config.vocab_size, seed=3)
    for _ in range(steps):
        logits = run(model, batch)
        loss = logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("base", sorted(BASES))
def test_peft_from_pretrained_matches_the_package_loader(base, tmp_path):
    config = tiny_config(half=False, **BASES[base])
    torch.manual_seed(0)
    from cpm_live.models import CPMBee

    weights = CPMBee(config).state_dict()

    def fresh() -> CPMBee:
        model = CPMBee(config)
        model.load_state_dict(weights)
        return model

    settings = LoraSettings(targets=("project_q", "project_v", "w_out"))
    trained = add_lora(fresh(), settings)
    train_adapter(trained)
    assert all(p.abs().sum() > 0 for p in lora_state_dict(trained).values())
    save_adapter(trained, settings, tmp_path / "run-delta-best", base_config=config)

    ours = fresh()
    load_adapter(ours, tmp_path / "run-delta-best")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unsupported layer" or missing-key warning either
        peft_model = PeftModel.from_pretrained(fresh(), str(tmp_path / "run-delta-best"))
    wrapped = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == 3 * config.num_layers

    batch = packed_batch(config.vocab_size, seed=5)
    with torch.no_grad():
        expected = run(ours.eval(), batch)
        got = run(peft_model.get_base_model().eval(), batch)
        without = run(fresh().eval(), batch)
    assert not torch.allclose(expected, without, atol=1e-3)  # the adapter changes the logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
