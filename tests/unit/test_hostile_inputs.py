"""Hostile or damaged inputs: every reader bounds what a file can make it allocate or
loop over, and refuses with one line naming the file and the fix."""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from cpm_live.checkpoint import CheckpointError, CheckpointReader, build_model
from cpm_live.checkpoint.adapters import load_adapter, save_adapter
from cpm_live.convert.compress import quantize_state_dict
from cpm_live.convert.export import main as export_main
from cpm_live.data import RawSerializer, SimpleDataset, build_dataset, safe_pickle_loads
from cpm_live.errors import AdapterError, DataFormatError, UnsafePickleError
from cpm_live.lora import LoraSettings, add_lora
from cpm_live.models import ConfigError, CPMBee, CPMBeeConfig
from cpm_live.utils import atomic_path


def tiny_config(**overrides) -> CPMBeeConfig:
    values = dict(vocab_size=64, dim_model=32, num_heads=2, dim_head=16, dim_ff=48, num_layers=2, half=False)
    return CPMBeeConfig(**{**values, **overrides})


# ------------------------------------------------------------------ model config


@pytest.mark.parametrize("key, value, message", [
    ("int4", "false", "'int4' .* must be true or false.*got 'false'"),
    ("half", "false", "'half' .* must be true or false"),
    ("int4_double_quant", 0, "'int4_double_quant' .* must be true or false"),
    ("dim_model", "128", "'dim_model' .* must be an integer.*got '128'"),
    ("num_layers", 2.0, "'num_layers' .* must be an integer"),
    ("num_heads", 0, "'num_heads' .* must be in 1\\.\\."),
    ("eps", -1, "'eps' .* small positive number"),
    ("dropout_p", 1.5, "'dropout_p' .* in \\[0, 1\\)"),
    ("mask_modules", [["yes", "no"], [True, True]], "'mask_modules' .* pairs of true/false"),
])
def test_config_values_of_the_wrong_type_are_refused_naming_the_key(tmp_path, key, value, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**tiny_config().to_dict(), key: value}))
    with pytest.raises(ConfigError, match=message) as info:
        CPMBeeConfig.from_json_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_config_json_booleans_and_numbers_still_load(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**tiny_config().to_dict(), "int4": True, "eps": 1e-5, "dropout_p": 0,
                                "mask_modules": [[0, 1], [False, False]]}))
    config = CPMBeeConfig.from_json_file(path)
    assert config.int4 is True and config.mask_modules == [[False, True], [False, False]]


def test_config_nested_too_deep_names_the_file_and_line(tmp_path):
    from cpm_live.checkpoint.hf_dir import config_values

    path = tmp_path / "config.json"
    path.write_text('{\n  "vocab_size": 64,\n  "dim_model": ' + "[" * 100_000 + "\n}\n")
    for read in (CPMBeeConfig.from_json_file, config_values):
        with pytest.raises(ConfigError, match=f"{path}:3: ") as info:
            read(path)
        assert "\n" not in str(info.value)


DEEP = b"[" * 100_000


def test_jsonl_record_nested_too_deep_names_the_file_and_line(tmp_path):
    from cpm_live.data import JsonlDataset

    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"input": "a", "<ans>": "b"}\n' + DEEP + b"\n")
    data = JsonlDataset(path)
    data.read()
    with pytest.raises(DataFormatError, match=f"^{path}:2: JSON nested deeper than"):
        data.read()
    data.close()


# ------------------------------------------------------------------ binary dataset records


def _dataset_with(tmp_path, payloads: list[bytes]):
    with build_dataset(str(tmp_path), "hostile", block_size=1 << 12, serializer=RawSerializer()) as writer:
        for payload in payloads:
            writer.write(payload)
    return SimpleDataset(str(tmp_path), shuffle=False)


def _self_referencing() -> bytes:
    loop: list = []
    loop.append(loop)
    return pickle.dumps({"input": "x", "<ans>": loop})


def _shared_references(depth: int) -> bytes:
    x: list = ["lol"]
    for _ in range(depth):
        x = [x, x, x]
    return pickle.dumps({"input": x})


def _dict_cycle() -> bytes:
    a: dict = {"input": "x"}
    a["<ans>"] = {"again": [a]}
    return pickle.dumps(a, protocol=0)


@pytest.mark.parametrize("payload, message", [
    (_self_referencing(), "contains itself"),
    (_dict_cycle(), "contains itself"),
    (_shared_references(40), "expands to more than"),  # 3**40 values in about 200 bytes
])
def test_self_referencing_and_exploding_pickles_are_refused_quickly(tmp_path, payload, message):
    data = _dataset_with(tmp_path, [payload])
    start = time.perf_counter()
    with pytest.raises(DataFormatError, match=f"hostile @ byte 0: .*{message}"):
        data.read()
    assert time.perf_counter() - start < 30  # unbounded, these never return


def test_binary_record_nested_too_deep_names_the_file_and_offset(tmp_path):
    dataset = _dataset_with(tmp_path, [DEEP[:4000]])
    with pytest.raises(DataFormatError, match=r"hostile @ byte 0: JSON nested deeper than"):
        dataset.read()


def test_plain_pickles_with_repeated_strings_still_load():
    record = {"input": ["same"] * 3000, "<ans>": {"a": list(range(500)), "b": ("t", None, 1.5)}}
    assert safe_pickle_loads(pickle.dumps(record)) == record
    with pytest.raises(UnsafePickleError, match="contains itself"):
        safe_pickle_loads(_self_referencing())


def _meta(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "meta.bin").read_text().splitlines()]


@pytest.mark.parametrize("field, value, message", [
    ("block_end", 1_000_000_000, "room for 1 block"),
    ("file_name", "../../../../etc/passwd", "file_name must be a file name inside"),
    ("file_name", "/etc/passwd", "file_name must be a file name inside"),
    ("block_size", 0, "block_size must be >= 1"),
    ("nbytes", "12", "nbytes must be a non-negative integer"),
])
def test_forged_meta_bin_entries_are_refused(tmp_path, field, value, message):
    _dataset_with(tmp_path, [json.dumps({"input": "a", "<ans>": "b"}).encode()])
    entries = _meta(tmp_path)
    entries[0][field] = value
    (tmp_path / "meta.bin").write_text("".join(json.dumps(e) + "\n" for e in entries))
    start = time.perf_counter()
    with pytest.raises(DataFormatError, match=f"meta.bin:1: invalid file entry .*{message}"):
        SimpleDataset(str(tmp_path), shuffle=False).read()
    assert time.perf_counter() - start < 30


def test_forged_record_length_is_refused_before_reading(tmp_path):
    _dataset_with(tmp_path, [json.dumps({"input": "a", "<ans>": "b"}).encode()])
    path = tmp_path / "hostile"
    raw = bytearray(path.read_bytes())
    assert raw[0:1] == b"\x1f"  # record magic, then the little-endian uint32 payload length
    raw[1:5] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="hostile @ byte 0: .*4294967280 bytes"):
        SimpleDataset(str(tmp_path), shuffle=False).read()


# ------------------------------------------------------------------ checkpoints


def _rewrite_safetensors_header(path, edit) -> None:
    """Apply ``edit`` to the JSON header of a safetensors file, keeping its data bytes."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    torch.manual_seed(0)
    torch.save(dict(CPMBee(tiny_config()).state_dict()), root / "base.pt")
    quantize_state_dict(root / "base.pt", root / "base-int4.safetensors")
    quantize_state_dict(root / "base.pt", root / "base-int8.safetensors", int8=True)
    tiny_config().to_json_file(root / "config.json")
    return root


PACKED = "encoder.layers.0.self_att.self_attention.project_q.weight"


@pytest.mark.parametrize("dtype", ["F8_E4M3", "BOOL", "I8"])
def test_relabelled_packed_4bit_weight_is_refused(int4_checkpoint, tmp_path, dtype):
    path = tmp_path / "relabelled.safetensors"
    path.write_bytes((int4_checkpoint / "base-int4.safetensors").read_bytes())
    _rewrite_safetensors_header(path, lambda h: h[PACKED].update(dtype=dtype))
    with pytest.raises(CheckpointError, match=f"{PACKED} is stored as torch\\.\\w+ but the model needs torch.uint8"):
        build_model(tiny_config(int4=True), path)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h[PACKED].update(shape=[-1, 1]), "not a list of non-negative integers"),
    (lambda h: h[PACKED].update(shape=[1.5, 1]), "not a list of non-negative integers"),
    (lambda h: h.update(__metadata__=["x"]), "__metadata__ must map strings to strings"),
    (lambda h: h["__metadata__"].update(format_version="99"), "version '99'.*upgrade cpm_live"),
])
def test_crafted_safetensors_headers_give_one_line_errors(int4_checkpoint, tmp_path, edit, message):
    path = tmp_path / "crafted.safetensors"
    path.write_bytes((int4_checkpoint / "base-int4.safetensors").read_bytes())
    _rewrite_safetensors_header(path, edit)
    with pytest.raises(CheckpointError, match=message):
        build_model(tiny_config(int4=True), path)


def test_quant_state_blob_without_shape_is_refused(int4_checkpoint, tmp_path):
    from cpm_live.checkpoint import read_state_dict

    state = read_state_dict(int4_checkpoint / "base-int4.safetensors")
    key = PACKED + ".quant_state.bitsandbytes__nf4"
    blob = json.loads(bytes(state[key].tolist()))
    del blob["shape"]
    state[key] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
    path = tmp_path / "noshape.safetensors"
    save_file(state, str(path), metadata=CheckpointReader(int4_checkpoint / "base-int4.safetensors").metadata)
    with pytest.raises(CheckpointError, match="records shape None.*re-create it"):
        build_model(tiny_config(int4=True), path)


def _export_error(root, path, *flags) -> str:
    """cpm-bee-export's error for ``path``: one line naming the file; nothing is written."""
    out = path.with_name("out.pt")
    with pytest.raises(SystemExit) as info:
        export_main(["--model-config", str(root / "config.json"), "--load", str(path), "--output", str(out), *flags])
    message = str(info.value)
    assert message.startswith(f"error: {path}") and "\n" not in message and not out.exists()
    return message


def _copy(root, kind, tmp_path, edit_header=None, edit_state=None):
    """The int4 or int8 checkpoint, its header or its tensors edited."""
    source = root / f"base-{kind}.safetensors"
    path = tmp_path / f"edited-{kind}.safetensors"
    if edit_state is None:
        path.write_bytes(source.read_bytes())
        _rewrite_safetensors_header(path, edit_header)
    else:
        from cpm_live.checkpoint import read_state_dict

        state = {k: v.clone() for k, v in read_state_dict(source).items()}
        edit_state(state)
        save_file(state, str(path), metadata=CheckpointReader(source).metadata)
    return path


@pytest.mark.parametrize("kind, dtype, needs", [
    ("int4", "F8_E4M3", "uint8"), ("int4", "BOOL", "uint8"), ("int4", "I8", "uint8"),
    ("int8", "F8_E4M3", "int8"), ("int8", "BOOL", "int8"), ("int8", "U8", "int8"),
])
def test_export_refuses_a_relabelled_quantized_weight(int4_checkpoint, tmp_path, kind, dtype, needs):
    path = _copy(int4_checkpoint, kind, tmp_path, lambda h: h[PACKED].update(dtype=dtype))
    message = _export_error(int4_checkpoint, path)
    assert f"{PACKED} is stored as torch." in message and f"the model needs torch.{needs}" in message


def _packed_as_two_columns(header) -> None:
    rows = header[PACKED]["shape"][0]
    header[PACKED]["shape"] = [rows // 2, 2]


def _set_blob(state, **values) -> None:
    key = PACKED + ".quant_state.bitsandbytes__nf4"
    blob = {**json.loads(bytes(state[key].tolist())), **values}
    state[key] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)


NORM = "encoder.output_layernorm.weight"
SCB = PACKED.removesuffix("weight") + "SCB"


@pytest.mark.parametrize("kind, header, state, message", [
    ("int4", _packed_as_two_columns, None, f"{PACKED} is torch.uint8 \\[\\d+, 2\\] but .* needs .* \\[\\d+, 1\\]"),
    ("int4", None, lambda s: s.pop(PACKED + ".absmax"), f"missing {PACKED}.absmax"),
    ("int4", None, lambda s: s.update({"encoder.extra": torch.zeros(2)}), "not in the model \\(1\\): encoder.extra"),
    ("int4", None, lambda s: s.pop(NORM), f"missing from the checkpoint \\(1\\): {NORM}"),
    ("int4", None, lambda s: _set_blob(s, blocksize=128), "quantized with quant_type=nf4, blocksize=128"),
    ("int4", None, lambda s: s[NORM].__setitem__(3, float("inf")), f"{NORM} holds NaN or inf"),
    ("int4", None, lambda s: s[PACKED + ".nested_absmax"].fill_(float("nan")), f"{PACKED} holds NaN or inf"),
    ("int8", None, lambda s: s[SCB].__setitem__(0, float("nan")), f"{PACKED} holds NaN or inf"),
    ("int8", None, lambda s: s.update({SCB: s[SCB][:-1].clone()}), f"{SCB} is torch.float32 \\[\\d+\\], expected"),
])
def test_export_refuses_a_damaged_quantized_checkpoint_naming_file_and_key(int4_checkpoint, tmp_path, kind, header,
                                                                           state, message):
    path = _copy(int4_checkpoint, kind, tmp_path, header, state)
    assert re.search(message, _export_error(int4_checkpoint, path))


def test_export_checks_the_quant_state_against_the_config(int4_checkpoint, tmp_path):
    path = tmp_path / "base-int4.safetensors"
    path.write_bytes((int4_checkpoint / "base-int4.safetensors").read_bytes())
    tiny_config(int4=True, int4_blocksize=128).to_json_file(tmp_path / "config.json")
    assert re.search("was quantized with nf4, blocksize 64, .* asks for nf4, blocksize 128",
                     _export_error(tmp_path, path))


def test_quantizing_a_checkpoint_with_nan_is_refused(tmp_path):
    torch.manual_seed(0)
    state = dict(CPMBee(tiny_config()).state_dict())
    state["encoder.layers.1.ffn.ffn.w_out.weight"][3, 5] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="w_out.weight holds NaN or inf"):
        quantize_state_dict(tmp_path / "nan.pt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------ adapters


def test_adapter_claiming_a_huge_rank_is_refused_before_allocating(tmp_path):
    torch.manual_seed(0)
    model = CPMBee(tiny_config())
    add_lora(model, LoraSettings(r=4))
    save_adapter(model, LoraSettings(r=4), tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 20_000_000}))
    fresh = CPMBee(tiny_config())
    start = time.perf_counter()
    with pytest.raises(AdapterError, match=r"\[4, 32\].*r=20000000"):
        load_adapter(fresh, tmp_path / "adapter")
    assert time.perf_counter() - start < 30
    assert not any("lora" in name for name, _ in fresh.named_parameters())


def test_adapter_config_with_string_alpha_is_refused(tmp_path):
    model = CPMBee(tiny_config())
    add_lora(model, LoraSettings(r=4))
    save_adapter(model, LoraSettings(r=4), tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "lora_alpha": "16"}))
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(CPMBee(tiny_config()), tmp_path / "adapter")


# ------------------------------------------------------------------ crash leftovers


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model.safetensors"
    script = (f"import time\nfrom cpm_live.utils import atomic_path\n"
              f"with atomic_path({str(target)!r}) as tmp:\n"
              f"    open(tmp, 'wb').write(b'x' * 1000)\n    print('writing', flush=True)\n    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    live = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    dead = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert live.stdout.readline() == b"writing\n" and dead.stdout.readline() == b"writing\n"
        dead.kill()
        dead.wait(timeout=60)
        assert len(list(tmp_path.glob(".model.safetensors.*.tmp"))) == 2
        with atomic_path(target) as tmp:
            open(tmp, "wb").write(b"new")
        left = list(tmp_path.glob(".model.safetensors.*.tmp"))
        assert len(left) == 1  # the live writer's file stays
        assert target.read_bytes() == b"new"
    finally:
        live.kill()
        live.wait(timeout=60)
        dead.stdout.close()
        live.stdout.close()
