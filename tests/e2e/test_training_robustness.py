"""No run loses work, hangs or trains on garbage: checkpoint history, crash leftovers,
the save-dir lock, non-finite values and data without answers, on the real training CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cpm_live.checkpoint import resume
from cpm_live.engine.torch_engine import TorchEngine
from cpm_live.training.cli import main as finetune
from cpm_live.training.metrics import read_metrics
from tests.conftest import DATA, base_args

QLORA = ("--use-delta", "--lr", "5e-3", "--log-interval", "1")


def qlora_args(tiny, save, steps, *extra):
    return base_args(tiny, save, steps, "--model-config", str(tiny / "config-int4.json"),
                     "--load", str(tiny / "base-int4.safetensors"), *QLORA, *extra)


def steps_on_disk(save) -> list[str]:
    return sorted(p.name for p in (save / "checkpoints").iterdir() if p.name.startswith("step-"))


def test_fresh_run_into_a_save_dir_with_checkpoints_is_refused(tiny, tmp_path):
    save = tmp_path / "run"
    finetune(qlora_args(tiny, save, 6, "--save-iters", "2"))
    before = steps_on_disk(save)
    metrics_before = (save / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=r"already holds checkpoints .*step-00000006.*--resume auto"):
        finetune(qlora_args(tiny, save, 3, "--save-iters", "1"))
    assert steps_on_disk(save) == before == ["step-00000004", "step-00000006"]
    assert (save / "metrics.jsonl").read_text() == metrics_before


def test_resume_auto_after_a_crash_takes_the_newest_complete_checkpoint(tiny, tmp_path, capsys):
    save = tmp_path / "run"
    finetune(qlora_args(tiny, save, 4, "--save-iters", "2", "--keep-checkpoints", "3"))
    root = save / "checkpoints"
    # What a kill -9 in the middle of saving step 6 leaves, plus a pointer to a deleted step:
    (root / "latest").write_text("step-00000009\n")
    shutil.copytree(root / "step-00000004", root / "step-00000006.partial")
    (root / "step-00000005").mkdir()  # an incomplete directory without the partial suffix
    (root / "step-00000005" / "trainer.pt").write_bytes(b"")
    result = finetune(qlora_args(tiny, save, 6, "--save-iters", "2", "--keep-checkpoints", "3", "--resume", "auto"))
    out = capsys.readouterr().out
    assert "names 'step-00000009', which is not the newest complete checkpoint" in out
    assert f"resumed from {root / 'step-00000004'} at step 4" in out
    assert result["step"] == 6
    assert [r["step"] for r in read_metrics(str(save / "metrics.jsonl")) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert not (root / "step-00000006.partial").exists()
    assert (root / "latest").read_text().strip() == "step-00000006"


@pytest.mark.parametrize("pointer", ["", "/etc\n", "../../..\n"])
def test_latest_is_advisory_and_never_followed(tiny, tmp_path, capsys, pointer):
    save = tmp_path / "run"
    finetune(qlora_args(tiny, save, 2, "--save-iters", "2"))
    (save / "checkpoints" / "latest").write_text(pointer)
    assert resume.find_checkpoint("auto", str(save)) == str(save / "checkpoints" / "step-00000002")
    assert "which is not the newest complete checkpoint" in capsys.readouterr().out


def test_resuming_an_older_checkpoint_explicitly_would_fork_history_and_is_refused(tiny, tmp_path):
    save = tmp_path / "run"
    finetune(qlora_args(tiny, save, 4, "--save-iters", "2"))
    older = save / "checkpoints" / "step-00000002"
    with pytest.raises(SystemExit, match=r"--resume .*step-00000002 is step 2 but .* later .*step-00000004"):
        finetune(qlora_args(tiny, save, 6, "--save-iters", "2", "--resume", str(older)))
    assert steps_on_disk(save) == ["step-00000002", "step-00000004"]


def test_pruning_keeps_newer_checkpoints_and_saving_a_step_twice_keeps_it_whole(tmp_path):
    engine = TorchEngine(device="cpu")
    trainable = {"w": torch.arange(4.0)}

    def save(step):
        return resume.save_checkpoint(engine, str(tmp_path), step, trainable, {"o": torch.zeros(1)},
                                    {"step": step}, keep=2)

    for step in (4, 6, 8):
        save(step)
    save(2)  # an older step written into a newer history: nothing newer may go
    assert [s for s, _ in resume.complete_checkpoints(str(tmp_path))] == [2, 6, 8]
    path = save(8)  # the same step again (SIGTERM right after a --save-iters save)
    assert resume._is_complete(path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000006", "step-00000008"]


LOCKER = """
import sys, time
from cpm_live.checkpoint.resume import SaveDirLock
lock = SaveDirLock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_save_dir_is_owned_by_one_run_and_a_dead_owner_does_not_block(tiny, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(save)], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(SystemExit, match=rf"--save {save} .*pid {holder.pid}"):
            finetune(qlora_args(tiny, save, 2))
        assert not (save / "metrics.jsonl").exists()
    finally:
        holder.kill()  # kill -9: no cleanup runs, the kernel drops the lock
        holder.wait(timeout=60)
        holder.stdout.close()
    assert finetune(qlora_args(tiny, save, 2))["step"] == 2


def test_nan_in_the_base_stops_at_the_first_step_and_saves_nothing(tiny, tmp_path):
    state = torch.load(tiny / "base.pt", weights_only=True)
    state["encoder.layers.0.ffn.ffn.w_in.w_0.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    save = tmp_path / "run"
    args = base_args(tiny, save, 5, "--model-config", str(tiny / "config.json"), "--load", str(tmp_path / "nan.pt"),
                     "--eval_dataset", str(DATA / "eval.jsonl"), "--eval-interval", "1", "--save-iters", "1", *QLORA)
    with pytest.raises(SystemExit, match=r"step 1: loss nan and grad_norm nan are not finite.*nan\.pt"):
        finetune(args)
    assert not (save / "checkpoints").exists()
    assert not [p for p in save.iterdir() if "delta" in p.name]


@pytest.mark.parametrize("flag", ["--dataset", "--eval_dataset"])
def test_data_without_answers_is_refused_before_the_model_loads(tiny, tmp_path, capsys, flag):
    """A later record without "<ans>" (line 15 of 20) is named by file:line before any model exists."""
    bad = tmp_path / "typo.jsonl"
    with open(DATA / "train.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:20]
    records[14] = {("answer" if k == "<ans>" else k): v for k, v in records[14].items()}
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = qlora_args(tiny, tmp_path / "run", 5, "--eval_dataset", str(DATA / "eval.jsonl"))
    args[args.index(flag) + 1] = str(bad)
    with pytest.raises(SystemExit, match=rf"error: {bad}:15: the record has no \"<ans>\".* {flag} "):
        finetune(args)
    assert "trainable params" not in capsys.readouterr().out


def test_a_wrong_dataset_path_fails_before_the_model_loads(tiny, tmp_path, capsys):
    args = qlora_args(tiny, tmp_path / "run", 5)
    args[args.index("--dataset") + 1] = str(tmp_path / "missing.jsonl")
    with pytest.raises(SystemExit, match=r"error: dataset .*missing\.jsonl does not exist"):
        finetune(args)
    assert "trainable params" not in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (["--lora-r", "4"], "lora_r: checkpoint 8, now 4"),
    (["--lora-alpha", "64"], "lora_alpha: checkpoint 16, now 64"),
    (["--max-length", "48"], "max_length: checkpoint 64, now 48"),
    (["--dataset", "EDITED"], "data: checkpoint '[0-9a-f]+', now '[0-9a-f]+'"),
])
def test_resume_with_other_settings_or_edited_data_is_refused(tiny, tmp_path, change, message):
    save = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    shutil.copyfile(DATA / "train.jsonl", data)
    args = qlora_args(tiny, save, 2, "--save-iters", "2")
    args[args.index("--dataset") + 1] = str(data)
    finetune(args)
    args = qlora_args(tiny, save, 4, "--save-iters", "2", "--resume", "auto")
    args[args.index("--dataset") + 1] = str(data)
    if change[0] == "--dataset":
        lines = data.read_text().splitlines(keepends=True)
        first = json.loads(lines[0])
        first["input"] = first["input"] + " edited"  # still valid, but not the data the run trained on
        data.write_text(json.dumps(first) + "\n" + "".join(lines[1:]))
    else:
        args += change
    with pytest.raises(SystemExit, match=rf"cannot resume .*step-00000002 with other settings \({message}"):
        finetune(args)


def test_resume_with_another_batch_size_warns_with_the_global_batch(tiny, tmp_path, capsys):
    save = tmp_path / "run"
    finetune(qlora_args(tiny, save, 2, "--save-iters", "2"))
    args = qlora_args(tiny, save, 3, "--resume", "auto")
    args[args.index("--batch-size") + 1] = "4"
    assert finetune(args)["step"] == 3
    out = capsys.readouterr().out
    assert "another batch geometry" in out and "global batch 8 -> 4 rows per step" in out


@pytest.mark.parametrize("flag, value", [("--log-interval", "0"), ("--eval-interval", "0"), ("--lr", "-1"),
                                         ("--save-iters", "-2"), ("--keep-checkpoints", "-1"),
                                         ("--dist-timeout", "0"), ("--dist-timeout", "nan")])
def test_bad_numeric_flags_fail_before_loading(tiny, tmp_path, flag, value):
    with pytest.raises(SystemExit, match=f"error: {flag} must be"):
        finetune(qlora_args(tiny, tmp_path / "run", 2, flag, value))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_checkpoint_file_holding_code_is_refused_in_one_line(tiny, tmp_path):
    save = tmp_path / "run"
    finetune(qlora_args(tiny, save, 2, "--save-iters", "2"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"step": 2, "evil": Evil()}, save / "checkpoints" / "step-00000002" / "trainer.pt")
    with pytest.raises(SystemExit, match=r"trainer\.pt: it holds objects other than tensors") as info:
        finetune(qlora_args(tiny, save, 4, "--resume", "auto"))
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


DISK_FULL = """
import resource, signal, sys, torch
from cpm_live.engine.torch_engine import TorchEngine
from cpm_live.checkpoint import resume
engine = TorchEngine(device="cpu")
small, big = {"w": torch.zeros(4)}, {"w": torch.zeros(1 << 18)}  # 1 MiB
resume.save_checkpoint(engine, sys.argv[1], 2, small, small, {"step": 2})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 19, 1 << 19))
trainable, optimizer = (big, small) if sys.argv[2] == "trainable" else (small, big)
try:
    resume.save_checkpoint(engine, sys.argv[1], 4, trainable, optimizer, {"step": 4})
except resume.TrainingError as e:
    print(e)
"""


@pytest.mark.parametrize("too_big", ["trainable", "optimizer"])  # safetensors' and torch.save's write errors
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path, too_big):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path), too_big], capture_output=True, text=True,
                         env=env, timeout=120)
    message = run.stdout.strip()
    partial = tmp_path / "checkpoints" / "step-00000004.partial"
    name = resume.TRAINABLE_FILE if too_big == "trainable" else resume.OPTIMIZER_FILE
    assert message.startswith(f"cannot write {partial / name} (") and "\n" not in message, run.stdout + run.stderr
    assert "is the disk full?" in message and "MiB free there" in message and "`resume` auto" in message
    assert steps_on_disk(tmp_path) == ["step-00000002"]
    assert resume._is_complete(tmp_path / "checkpoints" / "step-00000002")
    assert not partial.exists() and (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002\n"


def test_records_longer_than_max_length_are_reported_as_they_are_dropped(tiny, tmp_path, capsys):
    lines = (DATA / "train.jsonl").read_text().splitlines()[:40]
    long = json.dumps({"input": ",".join(["cat"] * 100), "question": "How many animals?", "<ans>": "100"})
    for at in (2, 9, 16, 23, 30, 37):  # lines 3, 10, ...: 6 of 46 records (13%)
        lines.insert(at, long)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = qlora_args(tiny, tmp_path / "run", 4)
    args[args.index("--dataset") + 1] = str(data)
    finetune(args)
    out = capsys.readouterr().out
    first = f"warning: {data}:3: the record has at least "
    assert first in out and "tokens, more than --max-length 64: dropped" in out
    assert out.index(first) < out.index("| step 1/")  # reported at the step that read it, not at epoch end
    assert "records read so far (" in out and "were longer than --max-length 64 and dropped: raise" in out
    dropped = [r["dropped_records"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
    assert dropped == sorted(dropped) and dropped[0] >= 1 and f"| dropped {dropped[-1]} |" in out
    assert f"; {dropped[-1]} record(s) longer than --max-length 64 were dropped" in out
