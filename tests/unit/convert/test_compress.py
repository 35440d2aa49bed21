"""quantize_state_dict / cpm-bee-quantize: bit-exact output, key matching, bad inputs, streaming memory."""

import json
from collections import OrderedDict

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cpm_live.checkpoint import CheckpointError
from cpm_live.convert.cli import main
from cpm_live.convert.compress import is_quant_target, quantize_state_dict
from cpm_live.errors import OutputError
from cpm_live.quant import format as qformat
from cpm_live.quant import int8 as qint8

LAYER = ["self_att.self_attention.project_q", "self_att.self_attention.project_k",
         "self_att.self_attention.project_v", "self_att.self_attention.attention_out",
         "ffn.ffn.w_in.w_0", "ffn.ffn.w_in.w_1", "ffn.ffn.w_out"]
SETTINGS = [
    pytest.param("nf4", True, id="nf4-double"),
    pytest.param("nf4", False, id="nf4-single"),
    pytest.param("fp4", True, id="fp4-double"),
    pytest.param("fp4", False, id="fp4-single"),
]


def cpm_bee_like(layers: int = 2, d: int = 48, ff: int = 80, seed: int = 0) -> OrderedDict:
    """A dense fp16 state dict with CPM-Bee's key layout (odd-sized, so blocks are partial)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict(
        [("input_embedding.weight", torch.randn(101, d, generator=g).half()),
         ("position_bias.relative_attention_bias", torch.randn(512, 4, generator=g).half())])
    for n in range(layers):
        p = f"encoder.layers.{n}."
        sd[p + "self_att.layernorm_before_attention.weight"] = torch.ones(d).half()
        for name in LAYER:
            shape = (d, ff) if name.endswith("w_out") else (ff, d) if "w_in" in name else (d, d)
            sd[p + name + ".weight"] = torch.randn(shape, generator=g).half()
        sd[p + "ffn.layernorm_before_ffn.weight"] = torch.ones(d).half()
    sd["encoder.output_layernorm.weight"] = torch.ones(d).half()
    return sd


@pytest.fixture
def checkpoint(tmp_path):
    sd = cpm_bee_like()
    path = tmp_path / "dense.pt"
    torch.save(sd, path)
    return sd, path


@pytest.mark.parametrize("quant_type,double_quant", SETTINGS)
def test_cli_output_is_bnb_exact_and_self_describing(checkpoint, tmp_path, quant_type, double_quant, capsys):
    sd, path = checkpoint
    out = tmp_path / "int4.safetensors"
    argv = ["--input-path", str(path), "--output-path", str(out), "--quant-type", quant_type, "--device", "cpu"]
    main(argv + ([] if double_quant else ["--no-double-quant"]))
    assert "14 weights quantized, 7 copied" in capsys.readouterr().out
    settings = qformat.QuantSettings(quant_type, double_quant, 64)
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert (meta["format"], meta["format_version"], meta["quant_type"]) == ("cpm_live.int4", "1", quant_type)
    assert (meta["blocksize"], meta["double_quant"], meta["compute_dtype"]) == ("64", str(double_quant).lower(),
                                                                                "float32")
    assert meta["source"] == str(path)
    originals = json.loads(meta["weights"])
    for key, value in sd.items():
        if not is_quant_target(key):
            assert torch.equal(stored[key], value), key
            continue
        assert originals[key] == {"dtype": "float16", "shape": list(value.shape)}
        packed, state = bnbF.quantize_4bit(value, blocksize=64, compress_statistics=double_quant,
                                           quant_type=quant_type)
        expected = qformat.pack(key, packed, state)
        for name, tensor in expected.items():
            assert torch.equal(stored[name], tensor), name
        rebuilt = bnbF.QuantState.from_dict({k[len(key) + 1:]: v for k, v in stored.items()
                                             if k.startswith(key + ".")}, device="cpu")
        assert rebuilt == state
    assert len(stored) == 7 + 14 * len(qformat.entry_keys("k", settings))


def test_safetensors_input_gives_the_same_tensors(checkpoint, tmp_path):
    sd, path = checkpoint
    save_file(dict(sd), tmp_path / "dense.safetensors")
    a = quantize_state_dict(path, tmp_path / "a.safetensors", device="cpu", progress=False)
    b = quantize_state_dict(tmp_path / "dense.safetensors", tmp_path / "b.safetensors", device="cpu",
                            progress=False)
    assert (a.quantized, a.copied) == (b.quantized, b.copied) == (14, 7)
    with safe_open(tmp_path / "a.safetensors", "pt") as fa, safe_open(tmp_path / "b.safetensors", "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("part_elements", [qformat.PART_ELEMENTS, 3000], ids=["default-parts", "small-parts"])
def test_output_bytes_do_not_depend_on_workers(checkpoint, tmp_path, fmt, part_elements, monkeypatch):
    """Threads finish parts and tensors in any order; the file must still be byte-for-byte the same
    (with parts of 3000 elements every weight is cut into several, the 48x4000 one into 64)."""
    monkeypatch.setattr(qformat, "PART_ELEMENTS", part_elements)
    sd, path = checkpoint
    sd["encoder.layers.2.ffn.ffn.w_out.weight"] = torch.randn(48, 4000, generator=torch.Generator().manual_seed(1)
                                                              ).half()  # one slow tensor among fast ones
    if fmt == "pt":
        torch.save(sd, path)
    else:
        path = tmp_path / "dense.safetensors"
        save_file(dict(sd), path)
    files = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}.safetensors"
        summary = quantize_state_dict(path, out, device="cpu", progress=False, workers=workers)
        assert summary.workers == workers and summary.quantized == 15
        files[workers] = out.read_bytes()
    assert files[1] == files[2] == files[3]
    with safe_open(tmp_path / "w1.safetensors", "pt") as f:  # and it is bnb's quantization of each weight
        key = "encoder.layers.2.ffn.ffn.w_out.weight"
        packed, _ = bnbF.quantize_4bit(sd[key], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(f.get_tensor(key), packed)
    int8 = {}
    for workers in (1, 3):
        out = tmp_path / f"int8-w{workers}.safetensors"
        quantize_state_dict(path, out, device="cpu", progress=False, workers=workers, int8=True)
        int8[workers] = out.read_bytes()
    assert int8[1] == int8[3]
    with safe_open(tmp_path / "int8-w3.safetensors", "pt") as f:  # row parts join to the whole weight's
        cb, scb = qint8.quantize(sd[key])
        assert torch.equal(f.get_tensor(key), cb) and torch.equal(f.get_tensor(key[:-len("weight")] + "SCB"), scb)


def test_workers_must_be_positive(checkpoint, tmp_path, capsys):
    _, path = checkpoint
    with pytest.raises(CheckpointError, match="workers must be a positive integer, got 0"):
        quantize_state_dict(path, tmp_path / "o.safetensors", device="cpu", workers=0)
    with pytest.raises(SystemExit):
        main(["--input-path", str(path), "--output-path", str(tmp_path / "o.safetensors"), "--workers", "0"])
    assert "must be a positive integer, got '0'" in capsys.readouterr().err
    assert torch.get_num_threads() >= 1


def test_targets_are_the_factory_projections_at_their_model_paths(tmp_path):
    # Targets are read from a meta-device model built by the linear factory (any layer index), so a
    # projection name elsewhere in the tree or as a substring is not one.
    sd = OrderedDict([
        ("encoder.layers.0.ffn.ffn.w_in.w_1.weight", torch.randn(8, 8).half()),  # target
        ("encoder.layers.0.ffn.ffn.w_in.w_10.weight", torch.randn(8, 8).half()),  # "w_1" substring
        ("encoder.layers.0.my_project_q.weight", torch.randn(8, 8).half()),
        ("encoder.layers.0.project_q.weight_scale", torch.randn(8, 8).half()),
        ("encoder.layers.0.w_out.bias", torch.randn(8).half()),
        ("w_0.weight", torch.randn(4, 4).half()),  # top-level module: not at a model path
        ("encoder.layers.17.self_att.self_attention.project_q.weight", torch.randn(8, 8).half()),  # target
    ])
    torch.save(sd, tmp_path / "in.pt")
    summary = quantize_state_dict(tmp_path / "in.pt", tmp_path / "out.safetensors", device="cpu", progress=False)
    assert (summary.quantized, summary.copied) == (2, 5)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert sorted(json.loads(f.metadata()["weights"])) == [
            "encoder.layers.0.ffn.ffn.w_in.w_1.weight", "encoder.layers.17.self_att.self_attention.project_q.weight"]
        assert f.get_tensor("encoder.layers.0.ffn.ffn.w_in.w_10.weight").dtype == torch.half


def test_existing_output_needs_force_and_failures_leave_it_alone(checkpoint, tmp_path):
    _, path = checkpoint
    out = tmp_path / "int4.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(SystemExit, match="already exists; pass --force"):
        main(["--input-path", str(path), "--output-path", str(out)])
    assert out.read_bytes() == b"old"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SystemExit, match="truncated.pt.*truncated or corrupt"):
        main(["--input-path", str(truncated), "--output-path", str(out), "--force"])
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    main(["--input-path", str(path), "--output-path", str(out), "--force"])
    with safe_open(out, "pt") as f:
        assert f.metadata()["format"] == "cpm_live.int4"


def test_bad_inputs_raise_clear_errors(checkpoint, tmp_path):
    sd, path = checkpoint
    out = tmp_path / "o.safetensors"

    def run(input_path, output=out):
        return quantize_state_dict(input_path, output, device="cpu", progress=False)

    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
        run(tmp_path / "missing.pt")
    run(path, tmp_path / "o.bin")  # any name (the qlora PR's README writes .bin): the content is safetensors
    with safe_open(tmp_path / "o.bin", "pt") as f:
        assert f.metadata()["format"] == "cpm_live.int4"
    bad_header = tmp_path / "bad.safetensors"
    bad_header.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="cannot read .*bad.safetensors.*truncated or not safetensors"):
        run(bad_header)
    save_file(dict(sd), tmp_path / "dense.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "dense.safetensors").read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="cut.safetensors.*but the file has"):
        run(cut)
    torch.save({"norm.weight": torch.ones(4)}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="none of the projection weights .*project_q.*is it CPM-Bee's"):
        run(tmp_path / "nothing.pt")
    torch.save({"state_dict": sd, "step": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match="not a flat dict of tensors .a training checkpoint"):
        run(tmp_path / "wrapped.pt")
    run(path)
    with pytest.raises(CheckpointError, match="already int4-compressed"):
        run(out, tmp_path / "twice.safetensors")
    with pytest.raises(OutputError, match="is this run's input"):
        quantize_state_dict(out, out, force=True, progress=False)
    with pytest.raises(SystemExit):
        main(["--input-path", str(path), "--output-path", str(out), "--quant-type", "int8"])


