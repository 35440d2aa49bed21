"""cpm-bee-export --delta: merging an adapter trained on a 4-bit base into a dense (or int4) export."""

import dataclasses

import pytest
import torch

from cpm_live.checkpoint import load_model_weights
from cpm_live.checkpoint.adapters import save_adapter
from cpm_live.convert.compress import quantize_state_dict
from cpm_live.convert.export import main as export_main
from cpm_live.lora import LoraSettings, add_lora
from cpm_live.models import CPMBee
from tests.tiny_models import packed_batch, run, small_vocab_config

TARGETS = ("project_q", "project_v", "w_1")


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """An int4 base checkpoint and an adapter with non-zero B trained-looking weights."""
    root = tmp_path_factory.mktemp("export")
    config = small_vocab_config()
    config.to_json_file(root / "config.json")
    torch.manual_seed(0)
    torch.save(dict(CPMBee(config).state_dict()), root / "base.pt")
    quantize_state_dict(root / "base.pt", root / "base-int4.safetensors", progress=False)
    int4 = dataclasses.replace(config, int4=True)
    with torch.device("meta"):
        model = CPMBee(int4)
    load_model_weights(model, int4, root / "base-int4.safetensors")
    settings = LoraSettings(r=4, alpha=8, targets=TARGETS)
    add_lora(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, settings, root / "adapter", base_config=int4)
    batch = packed_batch(config.vocab_size)
    return root, config, run(model.eval(), batch).detach(), batch


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("fp16", 2e-2), ("bf16", 3e-2)])
def test_merged_export_reproduces_int4_plus_adapter_logits(qlora, tmp_path, dtype, tol):
    root, config, expected, batch = qlora
    out = tmp_path / f"merged-{dtype}.pt"
    export_main(["--model-config", str(root / "config.json"), "--int4", "--load", str(root / "base-int4.safetensors"),
                 "--delta", str(root / "adapter"), "--output", str(out), "--dtype", dtype])
    state = torch.load(out, weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {
        {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]}
    fp = CPMBee(config)
    fp.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)  # original key layout
    got = run(fp.eval(), batch)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < tol, f"{dtype}: relative L2 error {rel:.2e}"
    base = CPMBee(config)
    base.load_state_dict(torch.load(root / "base.pt", weights_only=True))
    assert not torch.allclose(run(base.eval(), batch), expected, atol=1e-3)  # the adapter changed the output


def test_int4_reexport_reports_requantization_drift(qlora, tmp_path, capsys):
    root, *_ = qlora
    out = tmp_path / "merged-int4.safetensors"
    export_main(["--model-config", str(root / "config.json"), "--int4", "--load", str(root / "base-int4.safetensors"),
                 "--delta", str(root / "adapter"), "--output", str(out), "--dtype", "int4"])
    printed = capsys.readouterr().out
    drift = float(printed.split("vs the merged fp32 model = ")[1].split()[0])
    assert 0 < drift < 0.5 and out.exists()


def test_bad_adapters_fail_clearly(qlora, tmp_path):
    root, config, *_ = qlora
    args = ["--model-config", str(root / "config.json"), "--int4", "--load", str(root / "base-int4.safetensors"),
            "--output", str(tmp_path / "x.pt")]
    with pytest.raises(SystemExit, match="missing-adapter"):
        export_main(args + ["--delta", str(tmp_path / "missing-adapter")])
    other = dataclasses.replace(config, dim_ff=96)
    with torch.device("meta"):
        model = CPMBee(other)
    model.to_empty(device="cpu")
    add_lora(model, LoraSettings(r=4, alpha=8, targets=("w_1",)))
    save_adapter(model, LoraSettings(r=4, alpha=8, targets=("w_1",)), tmp_path / "other", base_config=other)
    with pytest.raises(SystemExit, match="error: .*"):
        export_main(args + ["--delta", str(tmp_path / "other")])
    assert not (tmp_path / "x.pt").exists()
