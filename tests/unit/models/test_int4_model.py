"""End to end on the tiny CPM-Bee: quantize CLI -> int4 model (CPU) -> logits -> export -> fp model."""

import dataclasses
from collections import OrderedDict

import pytest
import torch

from cpm_live.checkpoint import CheckpointError, load_model_weights, read_state_dict
from cpm_live.convert import export
from cpm_live.convert.cli import main as quantize_main
from cpm_live.models import CPMBee
from tests.tiny_models import packed_batch, relative_error, run, tiny_config

# NF4 (double quant, blocksize 64) changes each N(0, 1) projection weight by 9.2% (relative L2); this
# randomly initialised 2-layer model amplifies that to 0.268 relative L2 error of the logits (Gaussian
# weight noise of 10% gives 0.31). Unrelated weights give ~1.4. The exact check of the int4 math is the
# fp32-export comparison below.
LOGITS_RELATIVE_ERROR = 0.35


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    fp_model = CPMBee(config)
    state = OrderedDict((k, v.half()) for k, v in fp_model.state_dict().items())
    dense = tmp_path / "dense.pt"
    torch.save(state, dense)
    fp_model.load_state_dict(state)  # the fp model sees exactly the fp16 weights that get quantized
    compressed = tmp_path / "int4.safetensors"
    quantize_main(["--input-path", str(dense), "--output-path", str(compressed), "--device", "cpu"])
    return config, fp_model, dense, compressed


def test_int4_logits_close_to_fp_and_export_reproduces_them(setup, tmp_path):
    config, fp_model, dense, compressed = setup
    config4 = dataclasses.replace(config, int4=True, int4_compute_dtype="float32")  # "auto": bf16 on some CPUs
    int4_model = CPMBee(config4)
    load_model_weights(int4_model, config4, compressed)
    batch = packed_batch(config.vocab_size)
    with torch.no_grad():
        fp_logits, int4_logits = run(fp_model, batch), run(int4_model, batch)
    error = relative_error(int4_logits, fp_logits)
    print(f"\nint4 (nf4, double quant) vs fp logits: relative L2 error {error:.4f}")
    assert error < LOGITS_RELATIVE_ERROR

    # fp32 export = the exact dequantized weights: an fp model on it computes what the int4 model does.
    exported = tmp_path / "export.safetensors"
    summary = export.export_checkpoint(config, compressed, exported, "fp32", progress=False)
    assert summary.keys == len(fp_model.state_dict()) and summary.merged == []
    restored = CPMBee(config)
    load_model_weights(restored, config, exported)
    with torch.no_grad():
        torch.testing.assert_close(run(restored, batch), int4_logits, rtol=1e-4, atol=1e-4)
    # ... and an int4 export of the dense checkpoint is the same compressed file's content.
    export.main(["--model-config", config.source, "--load", str(dense), "--output",
                 str(tmp_path / "again.safetensors"), "--dtype", "int4"])
    a, b = read_state_dict(compressed), read_state_dict(tmp_path / "again.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_pt_export_has_the_original_layout(setup, tmp_path):
    config, fp_model, dense, compressed = setup
    out = tmp_path / "model.pt"
    export.main(["--model-config", config.source, "--load", str(compressed), "--output", str(out)])
    exported, original = torch.load(out, weights_only=True), read_state_dict(dense)
    assert isinstance(exported, OrderedDict) and list(exported) == list(original)
    for key, value in original.items():
        assert exported[key].dtype == torch.half and exported[key].shape == value.shape
        if "project" not in key and "w_" not in key and "attention_out" not in key:
            assert torch.equal(exported[key], value), key
    assert out.stat().st_size < 1.1 * dense.stat().st_size  # no memory-mapped storage saved along
    with pytest.raises(SystemExit, match="already exists; pass --force"):
        export.main(["--model-config", config.source, "--load", str(compressed), "--output", str(out)])


def test_delta_hook_adds_in_fp32_and_int4_merge_is_refused(setup, tmp_path):
    config, _, _, compressed = setup
    key = "encoder.layers.0.self_att.self_attention.project_q.weight"
    delta = torch.randn(64, 64) * 1e-3
    summary = export.export_checkpoint(config, compressed, tmp_path / "m.safetensors", "fp32",
                                       delta_fn=lambda k: delta if k == key else None, progress=False)
    assert summary.merged == [key]
    plain = export.export_checkpoint(config, compressed, tmp_path / "p.safetensors", "fp32", progress=False)
    merged, base = read_state_dict(summary.output_path), read_state_dict(plain.output_path)
    torch.testing.assert_close(merged[key], base[key] + delta, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="would re-quantize"):
        export.export_checkpoint(config, compressed, tmp_path / "x.safetensors", "int4", delta_fn=lambda k: None)
    with pytest.raises(CheckpointError, match="delta for .* has shape"):
        export.export_checkpoint(config, compressed, tmp_path / "y.safetensors", "fp16",
                                 delta_fn=lambda k: torch.zeros(3) if k == key else None, progress=False)
    with pytest.raises(CheckpointError, match="already int4"):
        export.export_checkpoint(config, compressed, tmp_path / "z.safetensors", "int4")


def test_export_checks_the_config(setup, tmp_path):
    config, _, _, compressed = setup
    other = dataclasses.replace(config, num_layers=3)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(9\): encoder.layers.2"):
        export.export_checkpoint(other, compressed, tmp_path / "o.pt", "fp16")
