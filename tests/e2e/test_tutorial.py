"""The CCPM tutorials run as written: the ```bash blocks of tutorials/basic_task_finetune/README_qlora.md
and README.md are executed in order by bash, on 40 synthetic raw CCPM lines, the tiny vocab and a tiny
random model; README_zh.md must carry exactly README_qlora.md's commands.

Only the sizes change (SCALE_* below: steps, batch, max length, process count), by exact text
replacement, and every replaced text must occur, so an edited README cannot slip past the test.
Blocks preceded by ``<!-- tutorial-test: skip`` (placeholders the test sets itself, GPU-only
launchers) are not run.
"""

import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cpm_live.convert.export import export_checkpoint
from cpm_live.data.encode import convert_data_to_id
from cpm_live.models import CPMBee, CPMBeeConfig
from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab
from cpm_live.training.metrics import read_metrics
from tests.conftest import REPO, SHARED

TUTORIAL = REPO / "tutorials" / "basic_task_finetune"
CCPM = SHARED / "ccpm"
SKIP_MARK = "<!-- tutorial-test: skip"
MAX_LENGTH = 256  # the synthetic records are ~100 tokens with the tiny vocab

# 10B-sized settings -> tiny ones. --lr is raised so a few steps move the LoRA weights visibly.
SCALE_QLORA = {
    "--epoch 1 --train-iters 500 --batch-size 2 --max-length 2048":
        f"--epoch 3 --train-iters 6 --batch-size 4 --max-length {MAX_LENGTH}",
    "--epoch 1 --train-iters 500 --batch-size 1 --max-length 2048":
        f"--epoch 3 --train-iters 6 --batch-size 2 --max-length {MAX_LENGTH}",
    "--save-iters 50": "--save-iters 3",
    "--eval-interval 50": "--eval-interval 3",
    "--lr 1e-4": "--lr 1e-2",
}
SCALE_PLAIN = {
    # finetune_cpm_bee.py trains every --epoch (CPM-Bee's meaning); the test stops it after 4 steps.
    "--epoch 5 --batch-size 5 --max-length 2048":
        f"--epoch 3 --train-iters 4 --stop-at-train-iters --batch-size 4 --max-length {MAX_LENGTH}",
    "--epoch 5 --batch-size 1 --max-length 2048":
        f"--epoch 3 --train-iters 4 --stop-at-train-iters --batch-size 2 --max-length {MAX_LENGTH}",
    "--nproc_per_node 8": "--nproc_per_node 2",
    "--eval-interval 50": "--eval-interval 2",
    "--save-iters 50": "--save-iters 2",
}
# Common characters of the tiny vocab, so the synthetic passages tokenize into known pieces.
CHARS = ("一是人了不在有大中国和为这上他个地年来我会以到时要出的生学说道民家子也成行下们于后就发自之对得主长可"
         "过天作分方用多你着部能市等业全里工公经本都而高政法面门动日进区事代那去心小同北定开产前其军还然起种所"
         "如现理机体表力好外与文当两实重新三么只山水关明从化平建又制南内西没此将员名手最东头者月间无安看见各城")


def bash_blocks(readme: Path) -> list[str]:
    """The ```bash blocks of `readme` that the test runs, in order."""
    pattern = re.compile(r"^(<!-- tutorial-test: skip[^\n]*-->\n)?```bash\n(.*?)^```$", re.S | re.M)
    return [m.group(2) for m in pattern.finditer(readme.read_text(encoding="utf-8")) if m.group(1) is None]


def scaled_script(readme: Path, scale: dict[str, str]) -> str:
    script = "\n".join(bash_blocks(readme))
    for old, new in scale.items():
        assert old in script, f"{readme.name} no longer contains {old!r}: update the test's scaling table"
        script = script.replace(old, new)
    return "set -euxo pipefail\n" + script


def raw_line(rng: random.Random) -> str:
    passage = "".join(rng.choice(CHARS) for _ in range(rng.randint(8, 20))) + "。"
    options = "".join(f"[{k}]" + "".join(rng.choice(CHARS) for _ in range(5)) for k in range(4))
    return json.dumps({"target": str(rng.randrange(4)), "input": f"[翻译]{passage}{options}[答案]"},
                      ensure_ascii=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What a user brings: vocab, config, fp checkpoint, raw CCPM files (32 train + 8 eval lines)."""
    root = tmp_path_factory.mktemp("inputs")
    vocab = build_tiny_vocab(root / "bee.txt")
    tokenizer = CPMBeeTokenizer(vocab)
    config = json.loads((REPO / "src" / "config" / "cpm-bee-tiny.json").read_text())
    config["vocab_size"] = tokenizer.vocab_size
    (root / "cpm-bee-tiny.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = CPMBee(CPMBeeConfig.from_json_file(root / "cpm-bee-tiny.json"))
    torch.save(dict(model.state_dict()), root / "model.pt")
    rng = random.Random(0)
    (root / "raw").mkdir()
    for name, count in (("train", 32), ("eval", 8)):
        (root / "raw" / f"{name}.jsonl").write_text("".join(raw_line(rng) + "\n" for _ in range(count)),
                                                    encoding="utf-8")
    return root


def run_tutorial(readme: str, scale: dict[str, str], inputs: Path, work: Path) -> Path:
    """Run the README's commands in a copy of the repository layout; returns the tutorial folder."""
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("cpm_live", "*.egg-info", "__pycache__"))
    folder = work / "tutorials" / "basic_task_finetune"
    folder.mkdir(parents=True)
    shutil.copy(TUTORIAL / "data_reformat.py", folder)
    env = {**os.environ, "VOCAB": str(inputs / "bee.txt"), "MODEL": str(inputs / "model.pt"),
           "CONFIG": str(inputs / "cpm-bee-tiny.json"), "CCPM_RAW": str(inputs / "raw"),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # python/torchrun of this venv
    script = scaled_script(TUTORIAL / readme, scale)
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{readme} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_data(folder: Path, inputs: Path) -> None:
    tokenizer = CPMBeeTokenizer(inputs / "bee.txt")
    for name, count in (("train", 32), ("eval", 8)):
        raw = read_jsonl(inputs / "raw" / f"{name}.jsonl")
        bee = read_jsonl(folder / "bee_data" / f"{name}.jsonl")
        assert [r["<ans>"] for r in bee] == [f"<option_{r['target']}>" for r in raw]
        rebuilt = ["[翻译]" + b["input"] + "".join(f"[{k}]{b['options'][f'<option_{k}>']}" for k in range(4))
                   + "[答案]" for b in bee]
        assert rebuilt == [r["input"] for r in raw]
        for record in bee:  # the tiny vocab knows every character, and every record fits --max-length
            assert all(tokenizer.encode(text)[1] == {} for text in [record["input"], *record["options"].values()])
            assert len(convert_data_to_id(tokenizer, record)[0]) < MAX_LENGTH
        meta = json.loads((folder / "bin_data" / name / "meta.bin").read_text().splitlines()[0])
        assert (meta["file_name"], meta["nlines"]) == ("ccpm_data", count)


def check_predictions(folder: Path, predictions: str, scores: str) -> None:
    refs = read_jsonl(folder / "bee_data" / "eval.jsonl")
    preds = read_jsonl(folder / predictions)
    assert [{k: v for k, v in p.items() if k != "<ans>"} for p in preds] == \
        [{k: v for k, v in r.items() if k != "<ans>"} for r in refs]
    assert all(isinstance(p["<ans>"], str) for p in preds)
    accuracy = sum(p["<ans>"] == r["<ans>"] for p, r in zip(preds, refs)) / len(refs)
    assert json.loads((folder / scores).read_text()) == {"accuracy": accuracy}


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_qlora_walkthrough(inputs, tmp_path):
    folder = run_tutorial("README_qlora.md", SCALE_QLORA, inputs, tmp_path)
    check_data(folder, inputs)
    int4, fp = folder / "ckpts" / "cpm-bee-int4.safetensors", inputs / "model.pt"
    assert int4.stat().st_size < 0.7 * fp.stat().st_size

    records = read_metrics(folder / "results" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    for tag in ("best", "last"):
        assert (folder / "results" / f"ccpm_qlora-delta-{tag}" / "adapter_model.safetensors").is_file()
    assert (folder / "results" / "checkpoints" / "step-00000006").is_dir()
    # Two processes with half the rows each see the same global batches: the same loss curve.
    assert losses(folder / "results-2gpu") == pytest.approx(losses(folder / "results"), rel=1e-4)

    check_predictions(folder, "results/eval_predictions.jsonl", "results/eval_scores.json")
    assert len(read_jsonl(folder / "results" / "eval_predictions_merged.jsonl")) == 8

    # The merged export changes exactly the LoRA targets (project_q, project_v) of the dequantized base.
    merged = torch.load(folder / "ckpts" / "cpm-bee-ccpm-fp16.pt", weights_only=True)
    config = CPMBeeConfig.from_json_file(inputs / "cpm-bee-tiny.json", int4=True)
    export_checkpoint(config, int4, tmp_path / "base.pt", "fp16", progress=False)
    base = torch.load(tmp_path / "base.pt", weights_only=True)
    assert merged.keys() == base.keys() == torch.load(fp, weights_only=True).keys()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    targets = {k for k in base if k.endswith(("project_q.weight", "project_v.weight"))}
    assert changed == targets and len(targets) == 4
    assert all(merged[k].dtype == torch.float16 for k in merged)

    # Step 8, the 8-bit base: the same run, predictions and scores, and a merged export in the int8 layout.
    int8 = folder / "ckpts" / "cpm-bee-int8.safetensors"
    assert int4.stat().st_size < int8.stat().st_size < fp.stat().st_size
    assert [r["step"] for r in read_metrics(folder / "results-int8" / "metrics.jsonl") if "loss" in r] == \
        [1, 2, 3, 4, 5, 6]
    assert json.loads((folder / "results-int8" / "model_config.cpm_live.json").read_text())["int8"] is True
    check_predictions(folder, "results-int8/eval_predictions.jsonl", "results-int8/eval_scores.json")
    exported_path = folder / "ckpts" / "cpm-bee-ccpm-int8.safetensors"
    with safe_open(exported_path, "pt") as exported, safe_open(int8, "pt") as base8:
        assert exported.metadata()["format"] == base8.metadata()["format"] == "cpm_live.int8"
        assert set(exported.keys()) == set(base8.keys())
        changed8 = {k for k in base8.keys() if not torch.equal(exported.get_tensor(k), base8.get_tensor(k))}
    assert {k.rsplit(".", 1)[0] for k in changed8} == {k.rsplit(".", 1)[0] for k in targets}


def test_plain_walkthrough(inputs, tmp_path):
    folder = run_tutorial("README.md", SCALE_PLAIN, inputs, tmp_path)
    check_data(folder, inputs)
    assert len(losses(folder / "results")) == 4 and len(losses(folder / "results-full")) == 4
    assert (folder / "results" / "ccpm_lora-delta-best" / "adapter_config.json").is_file()
    full = torch.load(folder / "results-full" / "ccpm_full-best.pt", weights_only=True)
    original = torch.load(inputs / "model.pt", weights_only=True)
    assert full.keys() == original.keys()
    assert not torch.equal(full["input_embedding.weight"], original["input_embedding.weight"])
    check_predictions(folder, "results/eval_predictions.jsonl", "results/eval_scores.json")


def test_chinese_walkthrough_has_the_same_commands():
    """README_zh.md is a translation: its commands (run or skipped) are byte-identical to README_qlora.md's."""
    def all_blocks(readme: Path) -> list[str]:
        return re.findall(r"^```bash\n(.*?)^```$", readme.read_text(encoding="utf-8"), re.S | re.M)

    english, chinese = TUTORIAL / "README_qlora.md", TUTORIAL / "README_zh.md"
    assert bash_blocks(chinese) == bash_blocks(english)
    assert all_blocks(chinese) == all_blocks(english)


def test_readmes_skip_only_what_they_mark():
    """Each README runs its data, training, generation and scoring steps; skipped blocks are marked."""
    for readme, scripts in (("README_qlora.md", ["data_reformat", "preprocess_dataset", "quantize_state_dict",
                                                 "finetune_cpm_bee_qlora", "text_generation", "evaluate",
                                                 "export_model", "--int8"]),
                            ("README.md", ["data_reformat", "preprocess_dataset", "finetune_cpm_bee",
                                           "text_generation", "evaluate"])):
        text = (TUTORIAL / readme).read_text(encoding="utf-8")
        run = "\n".join(bash_blocks(TUTORIAL / readme))
        assert all(name in run for name in scripts), readme
        assert len(bash_blocks(TUTORIAL / readme)) + text.count(SKIP_MARK) == text.count("```bash\n"), readme


# ---------------------------------------------------------------------------- data_reformat.py


def load_reformat():
    spec = importlib.util.spec_from_file_location("data_reformat", TUTORIAL / "data_reformat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reformat_record_layouts():
    reformat = load_reformat().reformat_record
    expected = {"input": "文。", "options": {"<option_0>": "甲", "<option_1>": "乙", "<option_2>": "丙",
                                            "<option_3>": "丁"},
                "question": "这段话形容了哪句诗的意境？", "<ans>": "<option_2>"}
    assert reformat({"target": "2", "input": "[翻译]文。[0]甲[1]乙[2]丙[3]丁[答案]"}) == expected
    assert reformat({"translation": "文。", "choices": ["甲", "乙", "丙", "丁"], "answer": 2}) == expected


@pytest.mark.parametrize("line, message", [
    ('{"target": "4", "input": "[翻译]a[0]b[1]c[2]d[3]e[答案]"}', "answer must be one of 0..3, got '4'"),
    ('{"target": "1", "input": "[翻译]a[0]b[1]c[2]d[答案]"}', "'input' is not"),
    ('{"input": "[翻译]a[0]b[1]c[2]d[3]e[答案]"}', "lacks ['target']"),
    ('{"target": "1", "input": ', "not valid JSON"),
    ('["a"]', "expected a JSON object"),
], ids=["target-out-of-range", "missing-option", "missing-key", "bad-json", "not-object"])
def test_reformat_names_file_and_line_of_a_bad_record(tmp_path, line, message):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    good = '{"target": "0", "input": "[翻译]a[0]b[1]c[2]d[3]e[答案]"}'
    (raw / "train.jsonl").write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(TUTORIAL / "data_reformat.py"), "--input", str(raw), "--output",
                           str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"{raw / 'train.jsonl'}:3: " in proc.stderr and message in proc.stderr, proc.stderr
    assert not (out / "train.jsonl").exists()


@pytest.mark.realvocab
@pytest.mark.skipif(not (CCPM / "raw_data" / "eval.jsonl").is_file(), reason=f"{CCPM} not present")
def test_reformat_matches_the_real_ccpm_bee_data(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = (CCPM / "raw_data" / "eval.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:50]
    (raw / "eval.jsonl").write_text("".join(lines), encoding="utf-8")
    assert load_reformat().main(["--input", str(raw), "--output", str(tmp_path / "bee")]) == 0
    expected = (CCPM / "bee_data" / "eval.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:50]
    assert (tmp_path / "bee" / "eval.jsonl").read_text(encoding="utf-8") == "".join(expected)
