"""Nothing a user owns is destroyed, and each mistake is one line: every command run as a careless or
hostile user would, on real files, checking that the files are unchanged afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import struct

import pytest
import torch

from cpm_live.checkpoint import open_checkpoint, resume
from cpm_live.checkpoint.adapters import save_adapter
from cpm_live.checkpoint.hf_dir import read_config
from cpm_live.config import CPMBeeConfig
from cpm_live.convert.cli import main as quantize_main
from cpm_live.convert.export import main as export_main
from cpm_live.data import jsonl
from cpm_live.data.jsonl import JsonlDataset
from cpm_live.data.preprocess import main as preprocess_main
from cpm_live.errors import CheckpointError, ConfigError, DataFormatError, TrainingError
from cpm_live.evaluation import main as evaluate_main
from cpm_live.generation.cli import main as generate_main
from cpm_live.lora import LoraSettings
from cpm_live.models import CPMBee
from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab
from cpm_live.training.plot import main as plot_main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A vocab, a config and a random fp32 checkpoint of a tiny model, and a Hugging Face export of it."""
    root = tmp_path_factory.mktemp("user_files")
    vocab = build_tiny_vocab(root / "vocab.txt")
    config = CPMBeeConfig(vocab_size=CPMBeeTokenizer(vocab).vocab_size, dim_model=32, num_heads=2, dim_head=16,
                          dim_ff=64, num_layers=2, half=False)
    config.to_json_file(root / "config.json")
    torch.manual_seed(0)
    torch.save(dict(CPMBee(config).state_dict()), root / "model.pt")
    export_main(["--model-config", str(root / "config.json"), "--load", str(root / "model.pt"), "--vocab", vocab,
                 "--format", "hf", "--dtype", "fp32", "--output", str(root / "hf")])
    return root


def digest(path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with the hash of its bytes."""
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    return {str(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def model_flags(files) -> list[str]:
    return ["--model-config", str(files / "config.json"), "--vocab", str(files / "vocab.txt")]


def test_export_hf_never_replaces_a_directory_holding_its_input(files, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes((files / "model.pt").read_bytes())
    (run / "notes.txt").write_text("mine")
    before = digest(run)
    with pytest.raises(SystemExit, match=r"error: --output .*run holds this run's input .*model\.pt"):
        export_main([*model_flags(files), "--load", str(run / "model.pt"), "--format", "hf", "--output", str(run),
                     "--force"])
    hf_before = digest(files / "hf")
    with pytest.raises(SystemExit, match="holds this run's input"):  # --output = the --load HF directory
        export_main(["--load", str(files / "hf"), "--format", "hf", "--dtype", "fp16", "--output",
                     str(files / "hf"), "--force"])
    assert digest(run) == before and digest(files / "hf") == hf_before


def test_export_hf_force_replaces_only_an_earlier_export(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = [*model_flags(files), "--load", str(files / "model.pt"), "--format", "hf", "--output", str(out)]
    with pytest.raises(SystemExit, match="already exists; pass --force"):
        export_main(args)
    with pytest.raises(SystemExit, match=r"holds .*notes\.txt, which this command does not write"):
        export_main([*args, "--force"])
    assert (out / "notes.txt").read_text() == "mine"


def test_generate_and_evaluate_never_write_over_an_input(files, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"input": "a", "<ans>": ""}) + "\n")
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"input": "a", "<ans>": "b"}) + "\n")
    before = digest(files / "model.pt") | digest(ref) | digest(data)
    with pytest.raises(SystemExit, match=r"error: --output .*model\.pt is this run's input"):
        generate_main([*model_flags(files), "--load", str(files / "model.pt"), "--input", str(data), "--output",
                       str(files / "model.pt"), "--force"])
    for output in (ref, data):
        with pytest.raises(SystemExit, match="is this run's input"):
            evaluate_main(["--pred", str(data), "--ref", str(ref), "--output", str(output), "--force"])
    os.link(ref, tmp_path / "hard-link.json")  # another name of the same file is the same file
    with pytest.raises(SystemExit, match="is this run's input"):
        evaluate_main(["--pred", str(ref), "--ref", str(ref), "--output", str(tmp_path / "hard-link.json"),
                       "--force"])
    assert digest(files / "model.pt") | digest(ref) | digest(data) == before


def test_generate_never_writes_over_the_vocab_found_beside_load(files, tmp_path):
    """Without --vocab, the vocab.txt beside --load is read: neither --output nor --stats may replace it."""
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"input": "a", "<ans>": ""}) + "\n")
    before = digest(files / "vocab.txt")
    flags = ["--model-config", str(files / "config.json"), "--load", str(files / "model.pt"), "--input", str(data)]
    with pytest.raises(SystemExit, match=r"error: --output .*vocab\.txt is this run's input"):
        generate_main([*flags, "--output", str(files / "vocab.txt"), "--force"])
    with pytest.raises(SystemExit, match=r"error: --stats .*vocab\.txt is this run's input"):
        generate_main([*flags, "--output", str(tmp_path / "out.jsonl"), "--stats", str(files / "vocab.txt"),
                       "--force"])
    assert digest(files / "vocab.txt") == before


def test_quantize_refuses_a_file_inside_its_input_directory(files):
    shard = next(p for p in (files / "hf").iterdir() if p.suffix == ".safetensors")
    before = digest(files / "hf")
    with pytest.raises(SystemExit, match=r"error: --output-path .* is inside this run's input directory .*hf"):
        quantize_main(["--input-path", str(files / "hf"), "--output-path", str(shard), "--force"])
    assert digest(files / "hf") == before


def test_an_existing_directory_is_never_an_output_file(files, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"input": "a", "<ans>": "b"}) + "\n")
    calls = {
        "quantize": lambda out: quantize_main(["--input-path", str(files / "model.pt"), "--output-path", out]),
        "export": lambda out: export_main([*model_flags(files), "--load", str(files / "model.pt"), "--output", out]),
        "generate": lambda out: generate_main([*model_flags(files), "--load", str(files / "model.pt"), "--input",
                                               str(data), "--output", out]),
        "evaluate": lambda out: evaluate_main(["--pred", str(data), "--ref", str(data), "--output", out]),
        "plot": lambda out: plot_main([str(data), "-o", out + ".png"]),
    }
    for name, call in calls.items():
        out = tmp_path / f"dir-{name}"
        (tmp_path / f"dir-{name}.png" if name == "plot" else out).mkdir()
        with pytest.raises(SystemExit, match="is a directory; name a file"):
            call(str(out))


def test_a_second_fresh_run_never_replaces_the_first_runs_adapter(tmp_path):
    save = tmp_path / "run"
    adapter = save / "cpm_bee_finetune-delta-last"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(TrainingError, match=r"already holds .*delta-last of an earlier run"):
        resume.check_history(None, str(save), ["metrics.jsonl", "cpm_bee_finetune-delta-last"])
    assert (adapter / "adapter_config.json").read_text() == "{}"


def test_the_save_lock_never_writes_through_a_symlink(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    (save / ".lock").symlink_to(target)
    with pytest.raises(TrainingError, match=r"\.lock is a symbolic link"):
        resume.SaveDirLock(str(save))
    assert target.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_a_read_only_lock_is_one_line(tmp_path):
    (tmp_path / ".lock").write_text("")
    (tmp_path / ".lock").chmod(0o444)
    with pytest.raises(TrainingError, match=r"cannot open .*\.lock \(Permission denied\)"):
        resume.SaveDirLock(str(tmp_path))


@pytest.mark.parametrize("setting, value", [("int4_quant_type", "fp4"), ("int4_blocksize", 128),
                                            ("int4_double_quant", False), ("lora_dropout", 0.1)])
def test_resume_names_a_changed_base_or_adapter_setting(setting, value):
    config = CPMBeeConfig(int4=True).to_dict()
    config.pop("int4_compute_dtype")
    saved = {"model": config, "lora": {"r": 8, "alpha": 16, "targets": ["project_q"], "dropout": 0.0},
             "max_length": 64, "data": "x", "batch": {}}
    current = json.loads(json.dumps(saved))
    if setting.startswith("lora_"):
        current["lora"][setting[5:]] = value
    else:
        current["model"][setting] = value
    resume.compare_run(saved, json.loads(json.dumps(saved)), "ckpt", print)  # same settings: fine
    with pytest.raises(TrainingError, match=f"other settings \\({setting}: checkpoint"):
        resume.compare_run(saved, current, "ckpt", print)


def test_export_refuses_an_adapter_of_another_base_shape(files, tmp_path):
    other = CPMBeeConfig.from_json_file(files / "config.json")
    other = CPMBeeConfig.from_dict({**other.to_dict(), "dim_ff": 96})
    state = {"encoder.layers.0.self_att.self_attention.project_q.lora_A.weight": torch.zeros(2, 32),
             "encoder.layers.0.self_att.self_attention.project_q.lora_B.weight": torch.zeros(32, 2)}
    save_adapter(state, LoraSettings(r=2, targets=("project_q",)), tmp_path / "adapter", base_config=other)
    with pytest.raises(SystemExit, match=r"another model shape \(dim_ff: adapter 96 vs model 64\)"):
        export_main([*model_flags(files), "--load", str(files / "model.pt"), "--delta", str(tmp_path / "adapter"),
                     "--output", str(tmp_path / "merged.pt")])
    assert not (tmp_path / "merged.pt").exists()


def write_safetensors(path, header: bytes, data: bytes = b"") -> str:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.parametrize("header, data, reason", [
    (b"[" * 200_000 + b"]" * 200_000, b"", "nested too deep"),
    (json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}).encode(), b"\0" * 4,
     "not two non-negative integers"),
    (json.dumps({"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode(), b"",
     "not a list of non-negative integers"),
    (json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4]}}).encode(), b"\0" * 4,
     "more elements than the"),
], ids=["nesting", "float offsets", "huge dim", "more than the file"])
def test_crafted_safetensors_headers_are_one_error(tmp_path, header, data, reason):
    path = write_safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CheckpointError, match=reason):
        with open_checkpoint(path):
            pass


@pytest.mark.parametrize("key, value", [("hidden_size", 10**30), ("vocab_size", 2**62),
                                        ("num_hidden_layers", 10**7)])
def test_hostile_hf_config_sizes_are_refused_naming_the_key(tmp_path, key, value):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "cpmbee", "hidden_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "vocab_size": 100, key: value}))
    with pytest.raises(ConfigError, match=f"config key '{key}' in .*config.json must be in 1\\.\\.[0-9]+, got"):
        read_config(str(path))


def test_a_full_disk_during_quantize_and_export_is_one_line_and_leaves_nothing(files, tmp_path):
    """A file-size limit makes writes fail as a full disk does (EFBIG instead of ENOSPC)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(SystemExit, match=r"error: cannot write .*q\.safetensors \(File too large\): is the disk "
                                             r"full\? .* MiB free"):
            quantize_main(["--input-path", str(files / "model.pt"), "--output-path", str(tmp_path / "q.safetensors")])
        with pytest.raises(SystemExit, match=r"error: cannot write .*e\.safetensors .*is the disk full"):
            export_main([*model_flags(files), "--load", str(files / "model.pt"), "--output",
                         str(tmp_path / "e.safetensors")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert os.listdir(tmp_path) == []


def test_nan_in_a_scale_or_the_embedding_is_refused_at_load(files, tmp_path):
    state = torch.load(files / "model.pt", weights_only=True)
    state["input_embedding.weight"][3, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"input": "a", "<ans>": ""}) + "\n")
    with pytest.raises(SystemExit, match=r"error: .*nan\.pt: input_embedding\.weight holds NaN or inf"):
        generate_main([*model_flags(files), "--load", str(tmp_path / "nan.pt"), "--input", str(data), "--output",
                       str(tmp_path / "out.jsonl")])


def test_a_lone_surrogate_is_refused_before_the_model_runs(files, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"input": "ok", "<ans>": ""}\n{"input": "bad \\ud800", "<ans>": ""}\n')
    with pytest.raises(SystemExit, match=r"in\.jsonl:2: the record holds a lone surrogate"):
        generate_main([*model_flags(files), "--load", str(files / "model.pt"), "--input", str(data), "--output",
                       str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl").exists()


def test_a_vocab_with_a_duplicate_or_missing_lines_is_one_line(files, tmp_path):
    lines = (files / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "dup.txt").write_text("\n".join(lines + [lines[20]]) + "\n", encoding="utf-8")
    (tmp_path / "short.txt").write_text("\n".join(lines[:-5]) + "\n", encoding="utf-8")
    base = ["--model-config", str(files / "config.json"), "--load", str(files / "model.pt"), "--format", "hf"]
    with pytest.raises(SystemExit, match=r"dup\.txt: line \d+ repeats entry"):
        export_main([*base, "--vocab", str(tmp_path / "dup.txt"), "--output", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"short\.txt has \d+ entries but the model has vocab_size"):
        export_main([*base, "--vocab", str(tmp_path / "short.txt"), "--output", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_preprocess_refuses_two_files_for_one_dataset(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("train.jsonl", "train.json"):
        (tmp_path / "in" / name).write_text(json.dumps({"input": "a", "<ans>": "b"}) + "\n")
    with pytest.raises(SystemExit, match=r"holds train\.json and train\.jsonl, which would both become the dataset"):
        preprocess_main(["--input", str(tmp_path / "in"), "--output_path", str(tmp_path / "out"),
                         "--output_name", "data"])
    assert not (tmp_path / "out").exists()


def test_a_line_longer_than_the_bound_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "array.jsonl"
    path.write_text('{"input": "a", "<ans>": "b"}\n[' + "1, " * 5000 + "1]\n")
    dataset = JsonlDataset(path)
    assert len(dataset) == 2
    dataset.read()
    with pytest.raises(DataFormatError, match=r"array\.jsonl:2: the line is longer than"):
        dataset.read()
