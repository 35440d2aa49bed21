"""Evaluation metrics against values computed by hand, and the evaluate CLI."""

import json
import math
import subprocess
import sys

import pytest

from cpm_live.evaluation import (
    ChineseAwareTokenizer,
    accuracy,
    bleu,
    compute_metrics,
    evaluate_files,
    main,
    rouge,
    text_pairs,
)
from tests.conftest import REPO


def test_tokenizer_splits_cjk_per_character_and_keeps_words():
    assert ChineseAwareTokenizer().tokenize("今天 Hello, World!好") == ["今", "天", "hello", "world", "好"]


def test_accuracy_compares_whole_answers():
    preds = ["<option_1>", "<option_3>", " <option_0>\n"]
    refs = ["<option_1>", "<option_2>", "<option_0>"]
    assert accuracy(preds, refs) == pytest.approx(2 / 3)
    assert accuracy([{"a": "x", "b": {"c": "y "}}], [{"a": "x", "b": {"c": "y"}}]) == 1.0
    assert accuracy([{"a": "x", "b": {"c": None}}], [{"a": "x", "b": {"c": "y"}}]) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy(["a", "b"], ["a"])


def test_rouge_known_values():
    assert rouge(["今天天气很好"], ["今天天气很好"]) == {"rouge-1": 1.0, "rouge-2": 1.0, "rouge-l": 1.0}
    assert rouge(["甲乙丙丁"], ["戊己庚辛"]) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    # 今 天 天 气 很 好 vs 今 天 天 气 不 错: unigrams 4/6 shared (今, 天 x2, 气), bigrams 3/5
    # (今天, 天天, 天气), longest common subsequence 今天天气 = 4; P = R for equal lengths.
    scores = rouge(["今天天气很好"], ["今天天气不错"])
    assert scores["rouge-1"] == pytest.approx(4 / 6)
    assert scores["rouge-2"] == pytest.approx(3 / 5)
    assert scores["rouge-l"] == pytest.approx(4 / 6)
    # Unequal lengths: pred 3 chars all in ref of 6: P = 1, R = 1/2, F = 2PR / (P + R) = 2/3; averaged
    # with a perfect pair -> (2/3 + 1) / 2.
    assert rouge(["今天天", "好"], ["今天天气不错", "好"])["rouge-1"] == pytest.approx((2 / 3 + 1) / 2)


def test_bleu_known_values():
    ref = "青山隐隐水迢迢秋"  # 8 characters = 8 zh tokens
    assert bleu([ref], [ref]) == pytest.approx(1.0)
    assert bleu(["甲乙丙丁"], ["戊己庚辛"]) == 0.0
    # One wrong last character, same length (brevity penalty 1): n-gram precisions 7/8, 6/7, 5/6, 4/5,
    # geometric mean (4/8)^(1/4).
    assert bleu([ref[:7] + "冬"], [ref]) == pytest.approx(math.pow(0.5, 0.25))


def test_text_pairs_follow_reference_leaves():
    preds = [{"a": "x", "b": {"c": None}}, "p", {"other": "q"}]
    refs = [{"a": "x", "b": {"c": "y"}}, "r", "s"]
    assert text_pairs(preds, refs) == (["x", "", "p", ""], ["x", "y", "r", "s"])


def test_compute_metrics_names_and_errors():
    scores = compute_metrics(["accuracy", "rouge", "bleu"], ["今天天气很好"], ["今天天气很好"])
    assert set(scores) == {"accuracy", "rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    assert all(v == pytest.approx(1.0) for v in scores.values())
    assert compute_metrics(["accuracy"], ["a"], ["b"]) == {"accuracy": 0.0}
    with pytest.raises(ValueError, match="unknown metric.*'f1'.*accuracy, rouge, bleu"):
        compute_metrics(["accuracy", "f1"], ["a"], ["a"])
    with pytest.raises(ValueError, match="no answers"):
        compute_metrics(["accuracy"], [], [])


def _jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in lines), encoding="utf-8")
    return str(path)


def test_evaluate_files_and_cli(tmp_path, capsys):
    pred = _jsonl(tmp_path / "pred.jsonl", [
        {"input": "1", "<ans>": "<option_1>"}, {"input": "2", "<ans>": "<option_0>"}])
    ref = _jsonl(tmp_path / "ref.jsonl", [
        {"input": "1", "<ans>": "<option_1>"}, {"input": "2", "<ans>": "<option_2>"}])
    assert evaluate_files(pred, ref, ["accuracy"]) == {"accuracy": 0.5}
    out = tmp_path / "scores.json"
    assert main(["--pred", pred, "--ref", ref, "--metrics", "accuracy,rouge", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and printed["accuracy"] == 0.5 and "rouge-l" in printed


def test_predictions_shifted_by_a_line_are_refused_naming_both_files(tmp_path):
    records = [{"input": f"q{i}", "<ans>": f"<option_{i % 4}>"} for i in range(5)]
    ref = _jsonl(tmp_path / "ref.jsonl", records)
    shifted = _jsonl(tmp_path / "pred.jsonl", records[1:] + [records[0]])  # same count, one line off
    with pytest.raises(SystemExit, match=rf"^error: {shifted}:1 .*{ref}:1.*'input'.*q1.*q0") as info:
        main(["--pred", shifted, "--ref", ref])
    assert "\n" not in str(info.value)
    swapped = _jsonl(tmp_path / "pred.jsonl", [records[0], records[2], records[1], *records[3:]])
    with pytest.raises(SystemExit, match=rf"{swapped}:2 is not the prediction for {ref}:2"):
        main(["--pred", swapped, "--ref", ref])
    # Predictions holding only their answers cannot be checked beyond the count; they still score.
    bare = _jsonl(tmp_path / "bare.jsonl", [{"<ans>": r["<ans>"]} for r in records])
    assert evaluate_files(bare, ref, ["accuracy"]) == {"accuracy": 1.0}


@pytest.mark.parametrize(("pred_lines", "message"), [
    ([{"<ans>": "a"}], r"pred\.jsonl has 1 records but .*ref\.jsonl has 2 \(first unpaired: .*ref\.jsonl:2\)"),
    ([{"<ans>": "a"}, {"input": "b"}], r'pred\.jsonl:2: the record has no "<ans>" key'),
    ([{"<ans>": "a"}, '{"<ans>": '], r"pred\.jsonl:2"),
], ids=["line-count", "no-ans", "bad-json"])
def test_evaluate_cli_names_bad_input(tmp_path, pred_lines, message):
    pred = _jsonl(tmp_path / "pred.jsonl", pred_lines)
    ref = _jsonl(tmp_path / "ref.jsonl", [{"<ans>": "a"}, {"<ans>": "b"}])
    with pytest.raises(SystemExit, match=message):
        main(["--pred", pred, "--ref", ref])


def test_evaluate_cli_rejects_unknown_metric_and_missing_file(tmp_path):
    ref = _jsonl(tmp_path / "ref.jsonl", [{"<ans>": "a"}])
    with pytest.raises(SystemExit, match="unknown metric"):
        main(["--pred", ref, "--ref", ref, "--metrics", "accuracy,meteor"])
    with pytest.raises(SystemExit, match="missing.jsonl does not exist"):
        main(["--pred", str(tmp_path / "missing.jsonl"), "--ref", ref])


def test_thin_script_runs(tmp_path):
    ref = _jsonl(tmp_path / "ref.jsonl", [{"<ans>": "今天天气很好"}])
    script = REPO / "src" / "evaluate.py"
    done = subprocess.run([sys.executable, str(script), "--pred", ref, "--ref", ref, "--metrics", "rouge"],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["rouge-1"] == 1.0
