"""Generation on a tiny random CPM-Bee (CPU): prompt building, incremental == full forward, beam search
== exhaustive search, greedy == beam 1, seeded sampling, `<ans>` parse-back, int4 / int8 / LoRA, the CLI."""

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cpm_live.checkpoint import build_model
from cpm_live.checkpoint.adapters import save_adapter
from cpm_live.convert.compress import quantize_state_dict
from cpm_live.data.encode import convert_data_to_id
from cpm_live.errors import DataFormatError
from cpm_live.evaluation import compute_metrics
from cpm_live.generation import (
    CPMBeeBeamSearch,
    CPMBeeGreedy,
    CPMBeeSampling,
    Decoder,
    beam_search,
    build_batch,
    build_prompt,
    fill_answers,
    top_k_top_p_filtering,
)
from cpm_live.generation.cli import main as generation_main
from cpm_live.layers import Linear8bit
from cpm_live.lora import LoraSettings, add_lora, lora_layers
from cpm_live.models import CPMBee, CPMBeeConfig
from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab
from tests.conftest import CONFIG_DIR, REPO, SHARED

REAL_VOCAB = SHARED / "vocab" / "bee.txt"
CCPM_EVAL = SHARED / "ccpm" / "bee_data" / "eval.jsonl"

OPTION_SAMPLE = {"input": "今天天气很好", "options": {"<option_0>": "好", "<option_1>": "不好", "<option_2>": "中"},
                 "question": "天气怎么样", "<ans>": "<option_1>"}
NESTED_SAMPLE = {"input": "hello world", "<ans>": {"a": "", "b": {"c": "", "d": ""}}}
TWO_ANSWER_SAMPLE = {"text": "一个中国", "<ans>": {"人": "", "地": ""}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CPMBeeTokenizer:
    return CPMBeeTokenizer(build_tiny_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def make_model(tokenizer: CPMBeeTokenizer, config_name: str = "cpm-bee-tiny.json", seed: int = 0) -> CPMBee:
    config = CPMBeeConfig.from_json_file(CONFIG_DIR / config_name, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = CPMBee(config)
    # The CPM-Bee init (std 0.02) gives near-uniform logits; std 1 makes the choices decisive.
    nn.init.normal_(model.input_embedding.weight, std=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> CPMBee:
    return make_model(tokenizer)


class LogitEdit(nn.Module):
    """Wraps a model; ``edit(logits, inference_kwargs)`` rewrites the logits of every inference call."""

    def __init__(self, model: CPMBee, edit):
        super().__init__()
        self.model = model
        self.config = model.config
        self.edit = edit

    def inference(self, **kwargs):
        logits, hidden, state = self.model.inference(**kwargs)
        return (None if logits is None else self.edit(logits, kwargs)), hidden, state


def restricted(model: CPMBee, allowed: list[int], bias: torch.Tensor | None = None) -> LogitEdit:
    """Only the ``allowed`` columns stay possible (others -1e9), after adding ``bias`` ``(V + X,)``."""
    def edit(logits, _):
        keep = torch.zeros(logits.size(-1), dtype=torch.bool)
        keep[allowed] = True
        return (logits if bias is None else logits + bias).masked_fill(~keep, -1e9)
    return LogitEdit(model, edit)


def scripted(model: CPMBee, script: list[int]) -> LogitEdit:
    """Each generated segment emits ``script`` (token at position p = script[p])."""
    def edit(logits, kwargs):
        if logits.size(1) == 1:  # decoding steps, not the prefill
            position = kwargs["position"][:, 0].long().clamp(max=len(script) - 1)
            logits = logits.clone()
            logits[torch.arange(logits.size(0)), 0, torch.tensor(script)[position]] += 1e4
        return logits
    return LogitEdit(model, edit)


def fed_tokens(tokenizer, batch, b: int, emitted: list[int]):
    """(ids, subs, segments) the decoder feeds after emitting ``emitted`` (bos first, eos -> next bos)."""
    prompt, vocab = batch.prompts[b], tokenizer.vocab_size
    index = 0
    ids, subs, segs = [tokenizer.bos_id], [0], [prompt.predict_segments[0][0]]
    for w in emitted:
        if w == tokenizer.eos_id:
            index += 1
            ids.append(tokenizer.bos_id), subs.append(0), segs.append(prompt.predict_segments[index][0])
            continue
        if w >= vocab:
            ids.append(int(batch.ext_table_ids[w - vocab])), subs.append(int(batch.ext_table_sub[w - vocab]))
        else:
            ids.append(w), subs.append(0)
        segs.append(segs[-1])
    return ids, subs, segs


def forward_logits(model, batch, b: int, fed: list[tuple[list[int], list[int], list[int]]]) -> list[torch.Tensor]:
    """Logits at the fed tokens of each ``(ids, subs, segments)`` continuation of prompt ``b``, from ONE
    training forward over the right-padded rows ``prompt + fed tokens`` (fed tokens have context 0)."""
    p = batch.prompts[b]
    n_prompt = len(p.input_ids)
    width = n_prompt + max(len(ids) for ids, _, _ in fed)
    rows = len(fed)

    def pad(values, dtype=torch.int32):
        out = torch.zeros(rows, width, dtype=dtype)
        for r, row in enumerate(values):
            out[r, : len(row)] = torch.as_tensor(np.asarray(row)).to(dtype)
        return out

    zeros = torch.zeros(rows, width, dtype=torch.int32)
    logits, _ = model(
        pad([np.concatenate([p.input_ids, ids]) for ids, _, _ in fed]),
        pad([np.concatenate([p.input_subs, subs]) for _, subs, _ in fed]),
        torch.tensor([n_prompt + len(ids) for ids, _, _ in fed], dtype=torch.int32),
        pad([[1] * n_prompt + [0] * len(ids) for ids, _, _ in fed], torch.bool), zeros,
        torch.full((rows, width), p.num_segments, dtype=torch.int32),
        pad([np.concatenate([p.segments, segs]) for _, _, segs in fed]), zeros,
        torch.as_tensor(p.segment_rel)[None].expand(rows, -1).contiguous(), zeros,
        batch.ext_table_ids, batch.ext_table_sub,
    )
    return [logits[r, n_prompt: n_prompt + len(ids)].float() for r, (ids, _, _) in enumerate(fed)]


def ext_column(batch, tokenizer, b: int, text: str) -> int:
    return next(col for col, s in batch.decode_tables[b].items() if s == text and col >= tokenizer.vocab_size)


# ------------------------------------------------------------------------------------------------ prompt


def test_prompt_removes_predicted_tokens_and_records_segments(tokenizer):
    prompt = build_prompt(tokenizer, NESTED_SAMPLE)
    assert prompt.answer_paths == [["a"], ["b", "c"], ["b", "d"]]
    placeholder_data = {"input": "hello world", "<ans>": {"a": "<ans_1>", "b": {"c": "<ans_2>", "d": "<ans_3>"}}}
    ids, _, context, segments, _, n, _ = convert_data_to_id(tokenizer, placeholder_data, shuffle_answer=False)
    predicted = np.flatnonzero((context == 0) & (ids == tokenizer.encoder["<ans>"]))
    assert prompt.predict_segments == [(int(segments[i]), k + 1) for k, i in enumerate(predicted)]
    assert np.array_equal(prompt.input_ids, ids[context == 1]) and prompt.num_segments == n
    assert NESTED_SAMPLE["<ans>"] == {"a": "", "b": {"c": "", "d": ""}}  # the input is left alone
    with pytest.raises(ValueError, match="no answer to predict"):
        build_prompt(tokenizer, {"input": "x", "<ans>": {}})
    with pytest.raises(ValueError, match='"<ans>" key'):
        build_prompt(tokenizer, {"input": "x"})


def test_batch_is_left_padded_with_shared_ext_table_and_bans(tokenizer):
    prompts = [build_prompt(tokenizer, OPTION_SAMPLE), build_prompt(tokenizer, {"q": "x§y", "<ans>": ""})]
    batch = build_batch(tokenizer, prompts, torch.device("cpu"))
    lengths = [len(p.input_ids) for p in prompts]
    short = int(np.argmin(lengths))
    pad = max(lengths) - min(lengths)
    assert (batch.inputs.num_segments[short, :pad] == 0).all()
    assert (batch.inputs.num_segments[:, -1] > 0).all()
    assert batch.inputs.position[short, pad:].tolist() == list(range(min(lengths)))
    v = tokenizer.vocab_size
    option_cols = {s: c for c, s in batch.decode_tables[0].items()}
    assert option_cols["<option_0>"] == tokenizer.encoder["<option>"]  # subscript 0 = the base token
    assert option_cols["<option_1>"] >= v and option_cols["<option_2>"] >= v
    assert batch.ext_table_ids.tolist() == [tokenizer.encoder["<option>"]] * 2
    assert sorted(batch.ext_table_sub.tolist()) == [1, 2]
    unk = tokenizer.unk_id
    assert batch.banned[0, unk] and not batch.banned[1, unk]  # sample 1 has an unknown run "§"
    assert batch.decode_tables[1][unk] == "§"
    assert not batch.banned[0, v:].any() and batch.banned[1, v:].all()  # foreign ext columns


# ------------------------------------------------------------------------------- incremental == forward


def test_incremental_decoding_matches_full_forward(tokenizer, model):
    samples = [TWO_ANSWER_SAMPLE, OPTION_SAMPLE]
    batch = build_batch(tokenizer, [build_prompt(tokenizer, s) for s in samples], torch.device("cpu"))
    t = tokenizer.encoder
    scripts = [[t["中"], t["国"], tokenizer.eos_id, t["人"], t["一个"]],
               [ext_column(batch, tokenizer, 1, "<option_2>"), t["天"], t["好"], t["<option>"], t["。"]]]
    decoder = Decoder(model, tokenizer, batch)
    cursors = [decoder.start(0), decoder.start(1)]
    steps = []
    for i in range(len(scripts[0]) + 1):
        steps.append(decoder.step(cursors))
        if i < len(scripts[0]):
            cursors = [decoder.advance(c, scripts[b][i], last_step=False)[0] for b, c in enumerate(cursors)]
    for b in range(2):
        expected = forward_logits(model, batch, b, [fed_tokens(tokenizer, batch, b, scripts[b])])[0]
        expected = expected.masked_fill(batch.banned[b], -10000.0)
        incremental = torch.stack([s[b] for s in steps])
        torch.testing.assert_close(incremental, expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ beam search == exhaustive


def exhaustive_best(tokenizer, model, batch, allowed, max_length, penalty, bias):
    """Score every finishable sequence over ``allowed`` with full forward passes; the best by
    sum(log p) / length, as beam search's hypotheses are ranked."""
    eos, n_segments = tokenizer.eos_id, len(batch.prompts[0].predict_segments)
    steps = max_length + 2  # beam search runs steps 0 .. max_length + 1

    def sequences(prefix, segment):
        for w in allowed:
            seq = prefix + [w]
            if len(seq) == steps or (w == eos and segment + 1 == n_segments):
                yield seq
            else:
                yield from sequences(seq, segment + (w == eos))

    finished = list(sequences([], 0))
    fed = [fed_tokens(tokenizer, batch, 0, seq[:-1]) for seq in finished]
    scored = []
    for seq, (ids, _, _), logits in zip(finished, fed, forward_logits(model, batch, 0, fed)):
        total = 0.0
        for t, w in enumerate(seq):
            row = logits[t] + bias
            seen = torch.tensor(sorted(set(ids[: t + 1])))  # the base ids fed so far, bos included
            row[seen] = torch.where(row[seen] < 0, row[seen] * penalty, row[seen] / penalty)
            total += row[allowed].log_softmax(-1)[allowed.index(w)].item()
        scored.append((total / len(seq), seq))
    scored.sort(key=lambda x: x[0], reverse=True)
    return scored


# Cases where ranking by sum(log p) / length picks another answer than by sum(log p), and where the
# penalty changes the winner; the two-answer winners cross the segment boundary.
@pytest.mark.parametrize(("sample", "tokens", "penalty", "eos_bias"), [
    (OPTION_SAMPLE, ("好", "<option_1>"), 3.0, 0.0),  # winner [<option_1>, <option_1>, 好, <option_1>]
    (OPTION_SAMPLE, ("国", "<option_1>"), 1.0, 2.0),  # winner [国, eos]
    (TWO_ANSWER_SAMPLE, ("中", "国"), 1.0, 0.0),  # winner [中, 国, eos, 国]
    (TWO_ANSWER_SAMPLE, ("人", "地"), 3.0, 0.5),  # winner [人, 地, eos, 地]
], ids=["one-answer-penalty", "one-answer-eos-bias", "two-answers", "two-answers-penalty-eos-bias"])
def test_beam_search_finds_the_exhaustive_best(tokenizer, model, sample, tokens, penalty, eos_bias):
    batch = build_batch(tokenizer, [build_prompt(tokenizer, sample)], torch.device("cpu"))
    allowed = [tokenizer.eos_id] + [ext_column(batch, tokenizer, 0, w) if w.startswith("<") else tokenizer.encoder[w]
                                    for w in tokens]
    bias = torch.zeros(tokenizer.vocab_size + batch.ext_table_ids.numel())
    bias[tokenizer.eos_id] = eos_bias  # shorter answers, so segment switches compete too
    max_length = 2
    scored = exhaustive_best(tokenizer, model, batch, allowed, max_length, penalty, bias)
    assert scored[0][0] - scored[1][0] > 1e-4, "tie: pick another seed"
    # A beam wider than the number of finished sequences keeps every candidate (exact search).
    decoder = Decoder(restricted(model, allowed, bias), tokenizer, batch, repetition_penalty=penalty)
    best = beam_search(decoder, beam_size=len(scored) + 1, max_length=max_length)[0]
    assert [w for w, _ in best] == scored[0][1]


@pytest.mark.parametrize("window", [None, 1], ids=["all-fed-tokens", "window-1"])
def test_repetition_penalty_covers_the_fed_window(tokenizer, model, window):
    batch = build_batch(tokenizer, [build_prompt(tokenizer, OPTION_SAMPLE)], torch.device("cpu"))
    a, b = tokenizer.encoder["天"], tokenizer.encoder["好"]
    plain, penalized = Decoder(model, tokenizer, batch), Decoder(model, tokenizer, batch, 2.0, window)
    cursors = [plain.start(0)]
    for word in (a, b):
        plain.step(cursors), penalized.step(cursors)
        cursors = [plain.advance(cursors[0], word, last_step=False)[0]]
    before, after = plain.step(cursors)[0], penalized.step(cursors)[0]
    hit = [tokenizer.bos_id, a, b] if window is None else [b]  # bos is fed too
    expected = before.clone()
    expected[hit] = torch.where(before[hit] < 0, before[hit] * 2.0, before[hit] / 2.0)
    torch.testing.assert_close(after, expected)
    assert not torch.equal(after, before)


# ------------------------------------------------------------------------------ strategies agree


def test_greedy_equals_beam_size_one_and_top_k_1_sampling(tokenizer, model):
    samples = [OPTION_SAMPLE, TWO_ANSWER_SAMPLE, NESTED_SAMPLE, {"input": "天气", "<ans>": ""}]
    eos = tokenizer.eos_id

    def bias_eos(logits, _):  # answers of a few tokens, so eos / segment switches are exercised
        logits = logits.clone()
        logits[..., eos] += 2.5
        return logits

    biased = LogitEdit(model, bias_eos)
    greedy = CPMBeeGreedy(biased, tokenizer).generate(copy.deepcopy(samples), max_length=6,
                                                      repetition_penalty=1.2)
    beam1 = CPMBeeBeamSearch(biased, tokenizer).generate(copy.deepcopy(samples), beam_size=1, max_length=6,
                                                         repetition_penalty=1.2)
    top1 = CPMBeeSampling(biased, tokenizer, seed=3).generate(copy.deepcopy(samples), max_length=6, top_k=1,
                                                              top_p=0.0, repetition_penalty=1.2)
    assert greedy == beam1 == top1
    # Both answers of the two-answer sample are reached (an eos switched segments); the nested
    # sample runs out of tokens in its first answer, so the later ones stay None.
    assert all(isinstance(v, str) for v in greedy[1]["<ans>"].values())
    assert greedy[2]["<ans>"]["b"] == {"c": None, "d": None}


def test_sampling_is_reproducible_with_a_seed(tokenizer, model):
    samples = [OPTION_SAMPLE, {"input": "天气", "<ans>": ""}]
    runs = [CPMBeeSampling(model, tokenizer, seed=s).generate(copy.deepcopy(samples), max_length=8, top_k=50,
                                                              top_p=0.95, temperature=1.5) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_batched_beam_search_equals_one_at_a_time(tokenizer, model):
    samples = [OPTION_SAMPLE, TWO_ANSWER_SAMPLE, {"input": "a", "<ans>": ""}]
    generator = CPMBeeBeamSearch(model, tokenizer)
    batched = generator.generate(copy.deepcopy(samples), beam_size=3, max_length=5, repetition_penalty=1.1)
    single = [generator.generate([copy.deepcopy(s)], beam_size=3, max_length=5, repetition_penalty=1.1)[0]
              for s in samples]
    assert batched == single


def test_top_k_top_p_filtering():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(top_k_top_p_filtering(logits, top_k=2)).tolist() == [[False, True, False, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = ~torch.isinf(top_k_top_p_filtering(probs.log(), top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, the token crossing it is kept
    assert top_k_top_p_filtering(logits, top_k=0, top_p=0.0).equal(logits)


# ------------------------------------------------------------------------------ parse-back


def test_answers_fill_nested_dicts_and_unreached_ones_are_none(tokenizer, model):
    t = tokenizer.encoder
    # Each segment says "一个中国" then eos; max_length 3 allows 5 tokens: segment a, then 2 tokens of c.
    script = [t["一个"], t["中国"], tokenizer.eos_id]
    for generator in (CPMBeeGreedy(scripted(model, script), tokenizer),
                      CPMBeeBeamSearch(scripted(model, script), tokenizer)):
        data = [copy.deepcopy(NESTED_SAMPLE)]
        out = generator.generate(data, max_length=3)
        assert out is data
        assert out[0] == {"input": "hello world", "<ans>": {"a": "一个中国", "b": {"c": "一个中国", "d": None}}}


def test_option_answer_decodes_ext_and_subscript_zero_tokens(tokenizer, model):
    batch = build_batch(tokenizer, [build_prompt(tokenizer, OPTION_SAMPLE)], torch.device("cpu"))
    option_2 = ext_column(batch, tokenizer, 0, "<option_2>")
    for script, expected in (([option_2, tokenizer.eos_id], "<option_2>"),
                             ([tokenizer.encoder["<option>"], tokenizer.eos_id], "<option_0>")):
        out = CPMBeeBeamSearch(scripted(model, script), tokenizer).generate([copy.deepcopy(OPTION_SAMPLE)])
        assert out[0]["<ans>"] == expected


def test_fill_answers_drops_trailing_eos_and_escapes(tokenizer):
    prompt = build_prompt(tokenizer, TWO_ANSWER_SAMPLE)
    eos, lt = tokenizer.eos_id, tokenizer.encoder["<"]
    data = copy.deepcopy(TWO_ANSWER_SAMPLE)
    fill_answers(tokenizer, data, prompt, {}, [(lt, 1), (eos, 1), (tokenizer.encoder["a"], 2)])
    assert data["<ans>"] == {"人": "<<", "地": "a"}  # decode escapes "<" as in the CPM-Bee format


# ------------------------------------------------------------------------------ int4, LoRA, errors


def test_int4_and_int4_lora_models_generate(tokenizer):
    model = make_model(tokenizer, "cpm-bee-tiny-int4.json")
    samples = [OPTION_SAMPLE, TWO_ANSWER_SAMPLE]
    base = CPMBeeBeamSearch(model, tokenizer).generate(copy.deepcopy(samples), beam_size=2, max_length=4)
    add_lora(model, LoraSettings())
    with_zero_lora = CPMBeeBeamSearch(model, tokenizer).generate(copy.deepcopy(samples), beam_size=2,
                                                                 max_length=4)
    assert with_zero_lora == base  # lora_B starts at zero
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=5.0)
    greedy = CPMBeeGreedy(model, tokenizer).generate(copy.deepcopy(samples), max_length=4)
    beam1 = CPMBeeBeamSearch(model, tokenizer).generate(copy.deepcopy(samples), beam_size=1, max_length=4)
    assert greedy == beam1 and all(isinstance(r["<ans>"], (str, dict)) for r in greedy)


def test_int8_checkpoint_generates_through_the_cli_as_the_fp_model_does(tmp_path, checkpoint, tokenizer, model):
    """quantize --int8 -> text_generation --int8: the CLI's answers are those of the int8 model built in
    process, whose option choice (decisive logits, ~1% weight error) is the fp model's."""
    int8 = checkpoint / "model-int8.safetensors"  # beside vocab.txt
    quantize_state_dict(checkpoint / "model.pt", int8, device="cpu", progress=False, int8=True)
    samples = [OPTION_SAMPLE, NESTED_SAMPLE, TWO_ANSWER_SAMPLE]
    inp, out = write_jsonl(tmp_path / "in.jsonl", samples), tmp_path / "out.jsonl"
    args = cli_args(checkpoint, inp, out, "--batch-size", "3", "--int8")
    args[args.index("--load") + 1] = str(int8)
    assert generation_main(args) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    int8_model = build_model(model.config.with_quantization("int8"), int8).eval()
    assert sum(isinstance(m, Linear8bit) for m in int8_model.modules()) == 7 * model.config.num_layers
    settings = {"beam_size": 3, "max_length": 4, "repetition_penalty": 1.1}  # the CLI's defaults
    assert records == CPMBeeBeamSearch(int8_model, tokenizer).generate(copy.deepcopy(samples), **settings)
    # The option choice is the fp model's; free text of a random model drifts apart at its first near-tie.
    assert records[0] == CPMBeeBeamSearch(model, tokenizer).generate(copy.deepcopy(samples[:1]), **settings)[0]
    # Without --int8 the checkpoint says what it is: the same answers.
    unflagged = tmp_path / "unflagged.jsonl"
    plain = [a for a in args if a != "--int8"]
    plain[plain.index("--output") + 1] = str(unflagged)
    assert generation_main(plain) == 0
    assert [json.loads(line) for line in unflagged.read_text(encoding="utf-8").splitlines()] == records


def test_bad_arguments_raise(tokenizer, model):
    generator = CPMBeeBeamSearch(model, tokenizer)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generator.generate([copy.deepcopy(OPTION_SAMPLE)], repetition_penalty=0.9)
    with pytest.raises(ValueError, match="beam_size"):
        generator.generate([copy.deepcopy(OPTION_SAMPLE)], beam_size=0)
    with pytest.raises(ValueError, match="temperature"):
        CPMBeeSampling(model, tokenizer).generate([copy.deepcopy(OPTION_SAMPLE)], temperature=0.0)
    other = CPMBee(CPMBeeConfig.from_json_file(CONFIG_DIR / "cpm-bee-tiny.json"))
    with pytest.raises(ValueError, match="vocab_size 1024 != tokenizer vocab size"):
        CPMBeeBeamSearch(other, tokenizer)


@pytest.mark.realvocab
@pytest.mark.skipif(not (REAL_VOCAB.exists() and CCPM_EVAL.exists()), reason="needs the shared CPM-Bee vocab and CCPM")
def test_ccpm_option_answers_with_the_real_vocab():
    """CCPM prompts share one ext table (<option> subscripts 1..3); an answer decodes to "<option_k>"
    and scores with accuracy against the references."""
    tokenizer = CPMBeeTokenizer(REAL_VOCAB)
    refs = [json.loads(line) for line in CCPM_EVAL.read_text(encoding="utf-8").splitlines()[:4]]
    batch = build_batch(tokenizer, [build_prompt(tokenizer, r) for r in refs], torch.device("cpu"))
    option = tokenizer.encoder["<option>"]
    assert sorted(zip(batch.ext_table_ids.tolist(), batch.ext_table_sub.tolist())) == [(option, s) for s in (1, 2, 3)]
    assert all(sorted(t.values()) == [f"<option_{k}>" for k in range(4)] for t in batch.decode_tables)
    option_3 = ext_column(batch, tokenizer, 0, "<option_3>")
    model = make_model(tokenizer)
    out = CPMBeeBeamSearch(scripted(model, [option_3, tokenizer.eos_id]), tokenizer).generate(copy.deepcopy(refs))
    assert [r["<ans>"] for r in out] == ["<option_3>"] * len(refs)
    expected = sum(r["<ans>"] == "<option_3>" for r in refs) / len(refs)
    assert compute_metrics(["accuracy"], [r["<ans>"] for r in out], [r["<ans>"] for r in refs]) == {
        "accuracy": expected}


# ------------------------------------------------------------------------------ CLI


@pytest.fixture()
def checkpoint(tmp_path, tokenizer, model):
    """A tiny .pt checkpoint with vocab.txt beside it, and the config it was made with."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "vocab.txt").write_text(Path(tokenizer.vocab_file).read_text(encoding="utf-8"), encoding="utf-8")
    config = folder / "config.json"
    config.write_text(model.config.to_json_string(), encoding="utf-8")
    return folder


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def cli_args(checkpoint: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["--model-config", str(checkpoint / "config.json"), "--load", str(checkpoint / "model.pt"),
            "--input", str(inp), "--output", str(out), "--device", "cpu", "--max-length", "4", *extra]


@pytest.mark.parametrize("strategy", [[], ["--greedy"], ["--sampling", "--seed", "1"]],
                         ids=["beam", "greedy", "sampling"])
def test_cli_writes_every_record_in_order(tmp_path, checkpoint, tokenizer, model, strategy):
    samples = [OPTION_SAMPLE, NESTED_SAMPLE, TWO_ANSWER_SAMPLE]
    inp = write_jsonl(tmp_path / "in.jsonl", samples)
    out = tmp_path / "out" / "out.jsonl"
    assert generation_main(cli_args(checkpoint, inp, out, "--batch-size", "2", *strategy)) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in r.items() if k != "<ans>"} for r in records] == \
        [{k: v for k, v in s.items() if k != "<ans>"} for s in samples]
    if not strategy:
        expected = CPMBeeBeamSearch(model, tokenizer).generate(copy.deepcopy(samples[:2]), beam_size=3,
                                                               max_length=4, repetition_penalty=1.1)
        expected += CPMBeeBeamSearch(model, tokenizer).generate(copy.deepcopy(samples[2:]), beam_size=3,
                                                                max_length=4, repetition_penalty=1.1)
        assert records == expected


def test_cli_output_scores_against_its_input(tmp_path, checkpoint):
    from cpm_live.evaluation import evaluate_files

    inp = write_jsonl(tmp_path / "in.jsonl", [OPTION_SAMPLE, NESTED_SAMPLE, TWO_ANSWER_SAMPLE])
    out = tmp_path / "out.jsonl"
    assert generation_main(cli_args(checkpoint, inp, out, "--greedy")) == 0
    assert set(evaluate_files(str(out), str(out), ["accuracy", "rouge"])) == {"accuracy", "rouge-1", "rouge-2",
                                                                            "rouge-l"}
    # The generation input is not a reference file: two of its answers are empty.
    with pytest.raises(DataFormatError, match=r"in.jsonl:2: the reference '<ans>' is empty \(2 of 3"):
        evaluate_files(str(out), str(inp), ["accuracy"])


def test_cli_keeps_finished_records_when_a_later_batch_fails(tmp_path, checkpoint, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", [OPTION_SAMPLE, NESTED_SAMPLE])
    out = tmp_path / "out.jsonl"
    original = CPMBeeBeamSearch.generate
    calls = itertools.count()

    def crash_on_second_batch(self, data_list, **kwargs):
        if next(calls) == 1:
            raise RuntimeError("simulated crash")
        return original(self, data_list, **kwargs)

    monkeypatch.setattr(CPMBeeBeamSearch, "generate", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generation_main(cli_args(checkpoint, inp, out, "--batch-size", "1"))
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["input"] == OPTION_SAMPLE["input"]


def test_cli_with_adapter(tmp_path, checkpoint, tokenizer, model):
    lora_model = make_model(tokenizer)
    add_lora(lora_model, LoraSettings(r=2))
    save_adapter(lora_model, LoraSettings(r=2), tmp_path / "adapter")
    inp = write_jsonl(tmp_path / "in.jsonl", [OPTION_SAMPLE])
    out = tmp_path / "out.jsonl"
    assert generation_main(cli_args(checkpoint, inp, out, "--delta", str(tmp_path / "adapter"))) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1


@pytest.mark.parametrize(("lines", "message"), [
    (['{"input": "a", "<ans>": ""}', '{"input": "b", '], r"in\.jsonl:2"),
    (['{"input": "a", "<ans>": ""}', '{"input": "b"}'], r'in\.jsonl:2: the record has no "<ans>" key'),
    (['["not", "an", "object"]'], r"in\.jsonl:1: expected a JSON object"),
    (['{"input": "a", "<ans>": {}}'], r"in\.jsonl:1: no answer to predict"),
    (['{"<问题>": "a", "<ans>": ""}'], r"in\.jsonl:1: Invalid token <问题>"),
], ids=["bad-json", "no-ans", "not-object", "empty-ans", "bad-special-token"])
def test_cli_names_the_bad_input_line(tmp_path, checkpoint, lines, message):
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    with pytest.raises(SystemExit, match=message):
        generation_main(cli_args(checkpoint, inp, tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()  # checked before anything is written


def test_cli_rejects_missing_files(tmp_path, checkpoint):
    inp = write_jsonl(tmp_path / "in.jsonl", [OPTION_SAMPLE])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit, match="--delta .*nowhere does not exist"):
        generation_main(cli_args(checkpoint, inp, out, "--delta", str(tmp_path / "nowhere")))
    with pytest.raises(SystemExit, match="--vocab .*missing.txt does not exist"):
        generation_main(cli_args(checkpoint, inp, out, "--vocab", str(tmp_path / "missing.txt")))
    (checkpoint / "vocab.txt").unlink()
    with pytest.raises(SystemExit, match="no vocab"):
        generation_main(cli_args(checkpoint, inp, out))
    with pytest.raises(SystemExit, match="dataset file .*absent.jsonl does not exist"):
        generation_main(cli_args(checkpoint, tmp_path / "absent.jsonl", out))
    with pytest.raises(SystemExit):
        generation_main(cli_args(checkpoint, inp, inp))  # would overwrite its own input


def test_thin_script_shows_help():
    script = REPO / "src" / "text_generation.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True)
    assert "--repetition-penalty" in done.stdout and "--delta" in done.stdout


@pytest.mark.parametrize("record, limit", [
    ({"input": "hello world " * 200_000, "<ans>": ""}, []),  # 2.4 MB of text: 400k tokens
    ({"input": {f"k{i}": "" for i in range(50_000)}, "<ans>": ""}, []),  # 100k segments: a 40 GB relation table
    ({"input": "hello world " * 100, "<ans>": ""}, ["--max-prompt-length", "64"]),
], ids=["long-text", "many-keys", "flag"])
def test_cli_refuses_a_prompt_longer_than_the_limit_before_loading(tmp_path, checkpoint, record, limit):
    inp = write_jsonl(tmp_path / "in.jsonl", [OPTION_SAMPLE, record])
    bound = limit[1] if limit else "2048"  # the tiny config's position_bias_max_distance
    with pytest.raises(SystemExit, match=rf"^error: {inp}:2: .*--max-prompt-length {bound}") as info:
        generation_main(cli_args(checkpoint, inp, tmp_path / "out.jsonl", *limit))
    assert "\n" not in str(info.value) and not (tmp_path / "out.jsonl").exists()


def test_beam_candidates_break_ties_towards_the_lower_column_like_argmax():
    from cpm_live.generation.beam_search import best_pairs

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 50), generator=generator).float()  # many exact ties
    values, columns = best_pairs(scores, 6)
    for row, vals, cols in zip(scores, values, columns):
        expected = sorted(range(row.numel()), key=lambda c: (-row[c].item(), c))[:6]
        assert cols == expected and vals == [row[c].item() for c in expected]
        assert cols[0] == row.argmax().item()
