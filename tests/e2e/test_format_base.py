"""Why a random CPM-Bee is no LoRA base (its init is the original's and caps the logits), and the
generic tasks of the format-trained stand-in (built from texts, never from answers)."""

import json

import pytest
import torch

from cpm_live.demo.format_base import (
    COPY,
    PICK,
    TASKS,
    WRITE,
    build_format_base,
    format_tasks,
    main,
    record_texts,
)
from cpm_live.layers import LayerNorm, Linear
from cpm_live.models import CPMBee
from tests.tiny_models import packed_batch, run, tiny_config


def test_random_init_is_the_originals_and_caps_every_logit_at_the_embedding_norm():
    """OpenBMB/CPM-Bee (95cc575) initialises Linear N(0, 1), EmbeddingExt N(0, 0.02) (models/bee.py
    passes init_std=0.02), BucketPositionBias N(0, 1), LayerNorm 1. The final RMSNorm makes
    |h| <= sqrt(d), so |logit_t| = |h . E_t| / sqrt(d) <= |E_t| (ext columns: |h . rot(E_t) / sqrt(d)|,
    the same bound): about 0.02 sqrt(d), whatever the projections compute."""
    config = tiny_config(vocab_size=4000)
    torch.manual_seed(0)
    model = CPMBee(config).eval()
    linears = [m.weight for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 7 * config.num_layers
    assert all(0.9 < w.std().item() < 1.1 and abs(w.mean().item()) < 0.05 for w in linears)
    assert 0.019 < model.input_embedding.weight.std().item() < 0.021
    assert 0.9 < model.position_bias.relative_attention_bias.std().item() < 1.1
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules() if isinstance(m, LayerNorm))

    with torch.no_grad():
        logits = run(model, packed_batch(config.vocab_size))
    cap = model.input_embedding.weight.norm(dim=1).max().item()  # ~0.02 * sqrt(64) = 0.16
    assert cap < 0.25 and logits.abs().max().item() <= cap * (1 + 1e-5)
    # So a frozen embedding and norm leave every answer token near ln(V): at best ln(V) - 2 * cap.
    log_probs = torch.log_softmax(logits, dim=-1)
    columns = logits.size(-1)  # V + X
    assert log_probs.max().item() <= -torch.log(torch.tensor(float(columns))).item() + 2 * cap


def test_record_texts_reads_every_string_but_the_answers():
    records = [{"input": "passage one", "options": {"<option_0>": "aa", "<option_1>": "bb"}, "question": "q?",
                "<ans>": "<option_1>"},
               {"input": "passage one", "nested": {"deep": {"x": "cc"}}, "<ans>": {"name": "secret answer"}}]
    assert record_texts(records) == ["passage one", "aa", "bb", "q?", "cc"]
    assert record_texts(records, min_chars=3, max_chars=11) == ["passage one"]


def test_format_tasks_take_turns_and_their_answers_point_at_the_input():
    texts = [f"text {i}" for i in range(10)]
    records = format_tasks(texts, 30, seed=3)
    assert records == format_tasks(texts, 30, seed=3) != format_tasks(texts, 30, seed=4)
    questions = [r["question"] for r in records]
    assert {q: questions.count(q) for q in questions} == {PICK: 10, WRITE: 10, COPY: 10} and len(TASKS) == 3
    for r in records:
        assert r["input"] in texts
        if r["question"] == COPY:
            assert set(r) == {"input", "question", "<ans>"} and r["<ans>"] == r["input"]
            continue
        options = list(r["options"].values())
        assert list(r["options"]) == [f"<option_{k}>" for k in range(4)] and len(set(options)) == 4
        assert options.count(r["input"]) == 1
        expected = f"<option_{options.index(r['input'])}>" if r["question"] == PICK else r["input"]
        assert r["<ans>"] == expected
    with pytest.raises(ValueError, match="at least 4 distinct texts"):
        format_tasks(texts[:3], 5, seed=0)


def test_bad_data_stops_with_the_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "ab", "<ans>": "many answers are not texts"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{data} hold 1 distinct texts"):
        build_format_base([str(data)], "unused-vocab.txt", str(tmp_path / "out"))
    data.write_text('{"input": "ab"}\n\n{"input": \n', encoding="utf-8")
    with pytest.raises(SystemExit, match=f"error: {data}:3: not valid JSON"):
        main(["--data", str(data), "--vocab", "unused-vocab.txt", "--out", str(tmp_path / "out")])
