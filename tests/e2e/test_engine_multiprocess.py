"""The torch (FSDP2) engine on 2 real gloo processes: one torchrun launch runs every 2-rank check
(tests/dist_scripts/engine_checks.py); the tests below read its results, and the 2 -> 1 resume runs
here, in this single process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpm_live.engine import get_engine
from tests.dist_scripts import engine_checks as checks
from tests.dist_scripts.launch import run_torchrun

pytestmark = pytest.mark.slow

SCRIPT = Path(checks.__file__)


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Path:
    """One torchrun launch: the 2-rank checks for an fp32 and an fp16 model."""
    out = tmp_path_factory.mktemp("engine2")
    for dtype, half in (("fp32", False), ("fp16", True)):
        source = checks.build_model(seed=1, half=half)  # a state dict written by one process
        with torch.no_grad():
            logits = checks.logits_of(source, checks.make_batch(seed=1), torch.device("cpu"))
        (out / dtype).mkdir()
        torch.save({"state": source.state_dict(), "logits": logits}, out / dtype / "one_rank.pt")
    run_torchrun(SCRIPT, 2, "--out", str(out), "--dtypes", "fp32,fp16")
    return out


def results_of(out: Path) -> list[dict]:
    return [json.loads((out / f"train-rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(launch) -> tuple[Path, list[dict]]:
    return launch / "fp32", results_of(launch / "fp32")


@pytest.fixture(scope="module")
def two_ranks_fp16(launch) -> tuple[Path, list[dict]]:
    return launch / "fp16", results_of(launch / "fp16")


def test_sharded_int4_forward_equals_unsharded(two_ranks):
    _, results = two_ranks
    for r in results:
        assert r["world_size"] == 2
        assert r["forward_max_diff"] == 0.0
        assert r["inference_max_diff"] == 0.0  # generation's incremental forward, gathered like forward
        assert r["packed_dtype"] == "torch.uint8"
    assert results[0]["full_packed_dtype"] == "torch.uint8"  # and the gathered state dict keeps it
    # the packed codes themselves are split between the ranks
    assert sum(r["packed_local_numel"] for r in results) == results[0]["inspect_packed_numel"]
    assert all(0 < r["packed_local_numel"] < results[0]["inspect_packed_numel"] for r in results)


def test_each_rank_holds_half_of_the_parameter_bytes(two_ranks):
    _, results = two_ranks
    total = results[0]["total_bytes"]
    for r in results:
        share = r["local_bytes"] / total
        print(f"rank {r['rank']}: {r['local_bytes']} of {total} parameter bytes ({share:.1%})")
        assert 0.45 < share < 0.55
    assert abs(sum(r["local_bytes"] for r in results) - total) < 0.01 * total  # padding only


def test_two_ranks_with_half_batches_train_like_one_rank_with_the_whole_batch(two_ranks):
    _, results = two_ranks
    for r in results:
        assert r["stepped"] == [True, True, True]
        assert r["loss_scale"] == 1.0  # fp32 trainable parameters: no loss scaling
        torch.testing.assert_close(r["losses"], r["ref_losses"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["norms"], r["ref_norms"], rtol=1e-5, atol=1e-7)
    main = results[0]
    assert main["trainable_keys_match"]
    assert main["weights_moved"] > 1e-2  # the steps changed the weights...
    assert main["trained_weights_diff"] < 1e-5  # ...identically on 2 ranks and on 1


def test_inspection_of_sharded_model_matches_unsharded(two_ranks):
    _, results = two_ranks
    for r in results:
        assert r["inspect_names_equal"]
        assert r["inspect_std_max_diff"] < 1e-6
        assert r["inspect_int_rows"] and all(std is None for _, std in r["inspect_int_rows"])


def test_state_dict_written_by_one_rank_loads_on_two(two_ranks):
    _, results = two_ranks
    for r in results:
        assert r["loaded_logits_diff"] == 0.0
        assert r["loaded_matches_file"] == 0.0


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_state_saved_on_two_ranks_resumes_on_one(launch, dtype):
    results = results_of(launch / dtype)
    assert results[0]["full_keys_match"] and results[0]["trainable_equals_full"]
    engine = get_engine("torch", seed=0, device="cpu")
    try:
        resumed = checks.resume_phase(engine, launch / dtype, half=dtype == "fp16")
    finally:
        engine.close()
    assert resumed["world_size"] == 1
    assert resumed["logits_diff"] < 1e-5
    assert abs(resumed["loss"] - resumed["saved_loss"]) < 1e-5  # same step: Adam moments, fp32 masters,
    assert resumed["weights_diff"] < 1e-5  # loss scale all restored


def test_fp16_overflow_is_skipped_on_every_rank_and_training_continues(two_ranks_fp16):
    _, results = two_ranks_fp16
    for r in results:
        assert r["forward_max_diff"] == 0.0 and r["packed_dtype"] == "torch.uint8"
        assert r["loss_scale"] == 2.0**20
        # 2**20 overflows fp16 gradients: every rank skips the first step together, halves the scale,
        # then steps (Adam run directly on fp16 values, as the reference does, turns NaN instead).
        assert r["stepped"] == [False, True, True]
        assert r["final_loss_scale"] == 2.0**19
        assert all(x == x for x in r["losses"])
        assert abs(r["losses"][0] - r["ref_losses"][0]) < 1e-3
    assert results[0]["engine_weights_moved"] > 1e-3


def test_ranks_that_disagree_on_the_config_all_get_a_clear_error(two_ranks):
    _, results = two_ranks
    for r in results:
        message = r["inconsistent_error"]
        assert message is not None
        assert "model config differs across ranks" in message and "dim_model: 64 vs 65" in message
