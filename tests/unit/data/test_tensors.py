"""The typed model-input contract: field names are CPMBee's parameters, and every producer feeds it."""

import inspect

import numpy as np
import pytest
import torch

from cpm_live.data.tensors import IGNORE_INDEX, CPMBeeInputs, LabelledInputs
from cpm_live.models import CPMBee
from tests.tiny_models import packed_batch, run, tiny_config


def _params(fn) -> list[str]:
    """The input parameters (the options past_key_values and logits_mask are not model inputs)."""
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "past_key_values", "logits_mask")]


def test_field_names_are_forward_and_inference_parameters():
    inputs = CPMBeeInputs.placeholder()
    assert sorted(inputs.forward_kwargs()) == sorted(_params(CPMBee.forward))
    inputs.position = torch.zeros(1, 1, dtype=torch.int32)
    assert sorted(inputs.inference_kwargs()) == sorted(_params(CPMBee.inference))


def test_keyword_call_equals_the_original_positional_call():
    config = tiny_config()
    torch.manual_seed(3)
    model = CPMBee(config).eval()
    batch = packed_batch(config.vocab_size)
    inputs = CPMBeeInputs.from_arrays(batch)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs.forward_kwargs())[0], run(model, batch), rtol=0, atol=0)


def test_logits_mask_projects_only_the_marked_positions():
    config = tiny_config()
    torch.manual_seed(3)
    model = CPMBee(config).eval()
    inputs = CPMBeeInputs.from_arrays(packed_batch(config.vocab_size))
    mask = torch.rand(inputs.input.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    with torch.no_grad():
        full, hidden = model(**inputs.forward_kwargs())
        some, same_hidden = model(**inputs.forward_kwargs(), logits_mask=mask)
        none, _ = model(**inputs.forward_kwargs(), logits_mask=torch.zeros_like(mask))
    assert some.shape == (int(mask.sum()), full.size(-1)) and none.shape == (0, full.size(-1))
    torch.testing.assert_close(some, full[mask], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(same_hidden, hidden, rtol=0, atol=0)


def test_placeholder_runs_and_has_no_label():
    config = tiny_config()
    torch.manual_seed(4)
    batch = LabelledInputs.placeholder()
    logits, _ = CPMBee(config).eval()(**batch.inputs.forward_kwargs())
    assert logits.shape == (1, 1, config.vocab_size + 1) and torch.isfinite(logits).all()
    assert batch.num_labels == 0 and batch.inputs.context.dtype == torch.bool


def test_from_arrays_casts_context_and_reports_what_is_missing():
    rng = np.random.default_rng(0)
    arrays = {name: rng.integers(0, 2, (2, 3)).astype(np.int32) for name in
              ("input", "input_sub", "context", "sample_ids", "num_segments", "segment", "segment_rel_offset",
               "segment_rel", "span")}
    arrays.update(length=np.array([3, 2], dtype=np.int32), ext_table_ids=np.zeros(1, np.int32),
                  ext_table_sub=np.ones(1, np.int32), target=np.full((2, 3), IGNORE_INDEX, np.int32))
    arrays["target"][0, 1] = 5
    batch = LabelledInputs.from_arrays(arrays)
    assert batch.inputs.context.dtype == torch.bool and batch.num_labels == 1
    assert batch.inputs.position is None
    with pytest.raises(ValueError, match="inference needs position"):
        batch.inputs.inference_kwargs()
    moved = batch.to("meta")
    assert moved.inputs.input.device.type == "meta" and moved.target.device.type == "meta"


def test_packer_output_is_the_contract(tmp_path):
    """The packer's arrays carry every field forward needs (names, not a table of keys)."""
    from cpm_live.data.pack import FinetuneDataset
    from cpm_live.tokenizers import CPMBeeTokenizer, build_tiny_vocab

    vocab = build_tiny_vocab(tmp_path / "vocab.txt")
    tokenizer = CPMBeeTokenizer(str(vocab))
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "abc", "<ans>": "de"}\n{"input": "a", "<ans>": "b"}\n', encoding="utf-8")
    batch = next(iter(FinetuneDataset(str(data), 2, 32, tokenizer, max_depth=8)))
    labelled = LabelledInputs.from_arrays(batch)
    assert labelled.num_labels == int((batch["target"] != IGNORE_INDEX).sum()) > 0
    assert set(labelled.inputs.forward_kwargs()) == set(_params(CPMBee.forward))
