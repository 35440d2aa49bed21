"""Two-rank checks of the torch (FSDP2) engine, all in one launch (a torchrun start costs seconds).

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/engine_checks.py --out DIR

Reads ``DIR/one_rank.pt`` (written by the 1-process test beforehand: a full state dict and the
logits it gives). Writes ``DIR/result-rank{r}.json`` and, from rank 0, the state saved on 2 ranks
(``two_rank_full.safetensors``, ``two_rank_train.pt``) plus the outcome of one more step
(``two_rank_after.pt``) for the 1-process resume check. Every comparison is against an unwrapped
copy in this process, trained with plain ``torch.optim.AdamW`` on the *global* batch.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cpm_live.engine import EngineError, get_engine, inspect_model, local_parameter_bytes
from cpm_live.layers import LayerNorm, Linear4bit
from cpm_live.models import CPMBee, CPMBeeConfig

CONFIG = Path(__file__).resolve().parents[2] / "src" / "config" / "cpm-bee-tiny-int4.json"
LR, WEIGHT_DECAY, MAX_NORM = 1e-2, 0.1, 0.05
GLOBAL_ROWS, LENGTH, CONTEXT = 4, 10, 4  # every row has LENGTH - CONTEXT labelled tokens


def build_model(seed: int) -> CPMBee:
    """Tiny int4 CPMBee; only the RMSNorm weights train (in blocks and in the root group)."""
    torch.manual_seed(seed)
    model = CPMBee(CPMBeeConfig.from_json_file(CONFIG))
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.weight.requires_grad_(True)
    return model


def make_batch(seed: int, rows: int = GLOBAL_ROWS, vocab: int = 1024) -> dict[str, torch.Tensor]:
    """Rows of one sample each; the first CONTEXT tokens are context, the rest are predicted."""
    g = torch.Generator().manual_seed(seed)
    i32 = torch.int32
    ext = 2
    context = torch.zeros(rows, LENGTH, dtype=torch.bool)
    context[:, :CONTEXT] = True
    targets = torch.randint(0, vocab + ext, (rows, LENGTH), generator=g)
    targets[context] = -100
    return {
        "input": torch.randint(0, vocab, (rows, LENGTH), generator=g, dtype=i32),
        "input_sub": torch.zeros(rows, LENGTH, dtype=i32),
        "length": torch.full((rows,), LENGTH, dtype=i32),
        "context": context,
        "sample_ids": torch.zeros(rows, LENGTH, dtype=i32),
        "num_segments": torch.ones(rows, LENGTH, dtype=i32),
        "segment": torch.zeros(rows, LENGTH, dtype=i32),
        "segment_rel_offset": torch.zeros(rows, LENGTH, dtype=i32),
        "segment_rel": torch.zeros(rows, 1, dtype=i32),
        "span": torch.zeros(rows, LENGTH, dtype=i32),
        "ext_table_ids": torch.tensor([5, 6], dtype=i32),
        "ext_table_sub": torch.tensor([1, 2], dtype=i32),
        "targets": targets,
    }


def rows_of(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    per = batch["input"].shape[0] // world_size
    return {k: v if k.startswith("ext_") else v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = [batch[k] for k in ("input", "input_sub", "length", "context", "sample_ids", "num_segments",
                                 "segment", "segment_rel_offset", "segment_rel", "span", "ext_table_ids",
                                 "ext_table_sub")]
    return model(*inputs)[0]


def reference_step(model: CPMBee, optimizer: torch.optim.Optimizer, batch: dict) -> tuple[float, float]:
    """Plain single-process step on the global batch: loss, pre-clip grad norm."""
    logits = logits_of(model, batch)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss), float(norm)


def engine_step(engine, model, optimizer, batch: dict) -> tuple[float, float]:
    """The training loop's step on this rank's rows: loss averaged over ranks, pre-clip norm."""
    local = rows_of(batch, engine.rank, engine.world_size)
    loss = engine.cross_entropy(logits_of(model, local), local["targets"])
    engine.backward(loss)
    norm = engine.clip_grad_norm(MAX_NORM)
    assert engine.step(optimizer)
    engine.zero_grad(optimizer)
    return float(engine.all_reduce_mean(loss.detach())), norm


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    engine = get_engine("torch", seed=0, device="cpu")
    result: dict = {"rank": engine.rank, "world_size": engine.world_size}

    # (a) sharded forward == unsharded forward; the 4-bit state stays uint8 and sharded.
    model = build_model(seed=0)
    model.encoder.activation_checkpointing = True  # the training loop's default; must work sharded
    reference = copy.deepcopy(model)
    reference.encoder.activation_checkpointing = False
    total_bytes = local_parameter_bytes(reference)
    wrapped = engine.wrap(model)
    # (b) each rank holds about half of the parameter bytes.
    result["local_bytes"] = local_parameter_bytes(wrapped)
    result["total_bytes"] = total_bytes
    batch = make_batch(seed=1)
    with torch.no_grad():
        result["forward_max_diff"] = float((logits_of(wrapped, batch) - logits_of(reference, batch)).abs().max())
    q = next(m for m in wrapped.modules() if isinstance(m, Linear4bit))
    result["packed_dtype"] = str(q.weight.dtype)
    result["packed_local_rows"] = q.weight.to_local().shape[0]
    result["packed_global_rows"] = q.weight.shape[0]
    result["local_bytes_after_forward"] = local_parameter_bytes(wrapped)

    # inspection of the sharded model equals the unsharded statistics; integers have no std.
    rows = {r["name"]: r for r in inspect_model(wrapped, engine=engine)}
    ref_rows = {r["name"]: r for r in inspect_model(reference)}
    key = "input_embedding.weight"
    result["inspect_std_diff"] = abs(rows[key]["std"] - float(reference.input_embedding.weight.std()))
    result["inspect_rows_equal"] = all(
        (rows[n]["std"] is None) == (ref_rows[n]["std"] is None)
        and (rows[n]["std"] is None or abs(rows[n]["std"] - ref_rows[n]["std"]) < 1e-6) for n in ref_rows)
    result["inspect_int_std"] = [rows[n]["std"] for n in rows if rows[n]["dtype"] == "uint8"][:1]

    # (d, 1 -> 2) a full state dict written by one process loads into the sharded model.
    one_rank = torch.load(out / "one_rank.pt", weights_only=True)
    engine.load_state_dict(wrapped, one_rank["state"], strict=True)
    reference.load_state_dict(one_rank["state"], strict=True)
    with torch.no_grad():
        result["loaded_logits_diff"] = float((logits_of(wrapped, batch) - one_rank["logits"]).abs().max())

    # (c) a few steps on 2 ranks with half the rows each == 1 process on all rows.
    optimizer = engine.optimizer([p for p in wrapped.parameters() if p.requires_grad], lr=LR,
                                 weight_decay=WEIGHT_DECAY)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=LR,
                                weight_decay=WEIGHT_DECAY)
    result["losses"], result["ref_losses"], result["norms"], result["ref_norms"] = [], [], [], []
    for step in range(3):
        batch = make_batch(seed=10 + step)
        loss, norm = engine_step(engine, wrapped, optimizer, batch)
        ref_loss, ref_norm = reference_step(reference, ref_opt, batch)
        result["losses"].append(loss)
        result["ref_losses"].append(ref_loss)
        result["norms"].append(norm)
        result["ref_norms"].append(ref_norm)
    trainable = engine.state_dict(wrapped, trainable_only=True)
    ref_trainable = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    if engine.is_main:
        result["trainable_keys_match"] = sorted(trainable) == sorted(ref_trainable)
        result["trained_weights_diff"] = max_diff(trainable, ref_trainable)
        result["weights_moved"] = float((ref_trainable["encoder.output_layernorm.weight"] - 1).abs().max())

    # (d, 2 -> 1) save on 2 ranks; one more step shows what a resumed run must reproduce.
    full = engine.state_dict(wrapped)
    state = engine.training_state(optimizer)
    with torch.no_grad():
        logits = logits_of(wrapped, make_batch(seed=1))
    if engine.is_main:
        result["full_keys"] = len(full)
        result["full_packed_dtype"] = str(full[next(k for k in full if k.endswith("project_q.weight"))].dtype)
        result["trainable_equals_full"] = all(torch.equal(v, full[k]) for k, v in trainable.items())
        save_file({k: v.contiguous() for k, v in full.items()}, out / "two_rank_full.safetensors")
        torch.save({"state": state, "logits": logits}, out / "two_rank_train.pt")
    result["next_loss"], _ = engine_step(engine, wrapped, optimizer, make_batch(seed=20))
    after = engine.state_dict(wrapped, trainable_only=True)
    if engine.is_main:
        torch.save({"trainable": after, "loss": result["next_loss"]}, out / "two_rank_after.pt")

    # (e) ranks that disagree get a clear error each, not a hang.
    try:
        engine.check_consistent({"dim_model": 64 + engine.rank, "num_layers": 2}, "model config")
        result["inconsistent_error"] = None
    except EngineError as e:
        result["inconsistent_error"] = str(e)

    engine.barrier()
    (out / f"result-rank{engine.rank}.json").write_text(json.dumps(result, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
