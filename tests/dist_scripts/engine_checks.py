"""Multi-rank checks of an engine, all in one launch (each torchrun start costs seconds).

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/engine_checks.py --out DIR \
        [--engine torch|bmtrain] [--device cpu|cuda] [--dtypes fp32,fp16] [--phase train|resume]

For each dtype, in ``DIR/<dtype>``: ``train`` reads ``one_rank.pt`` (a full state dict and its
logits, written by one process beforehand), checks forward parity, sharding, inspection, loading,
training parity and the inconsistent-config error, and writes ``train-rank{r}.json`` plus, from
rank 0, what was saved on these ranks (``sharded_full.safetensors``, ``sharded_train.pt``) and the
outcome of one more step (``sharded_after.pt``). ``resume`` (run on a different number of ranks)
loads those and must reproduce that step; it writes ``resume-rank{r}.json``. Every comparison is against an unwrapped
copy in the same process, trained with plain ``torch.optim.AdamW`` on the *global* batch.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from cpm_live.engine import Engine, EngineError, get_engine, inspect_model, local_parameter_bytes
from cpm_live.layers import LayerNorm, Linear4bit
from cpm_live.models import CPMBee, CPMBeeConfig

CONFIG = Path(__file__).resolve().parents[2] / "src" / "config" / "cpm-bee-tiny-int4.json"
LR, WEIGHT_DECAY, MAX_NORM = 1e-2, 0.1, 0.05
GLOBAL_ROWS, LENGTH, CONTEXT = 4, 10, 4  # every row has LENGTH - CONTEXT labelled tokens
MODEL_INPUTS = ("input", "input_sub", "length", "context", "sample_ids", "num_segments", "segment",
                "segment_rel_offset", "segment_rel", "span", "ext_table_ids", "ext_table_sub")


def build_model(seed: int, half: bool = False) -> CPMBee:
    """Tiny int4 CPMBee; only the RMSNorm weights train (in blocks and in the root group)."""
    torch.manual_seed(seed)
    # fp32 4-bit matmuls on every CPU ("auto" is bf16 on bf16 CPUs): the checks compare ranks to 1e-5
    model = CPMBee(CPMBeeConfig.from_json_file(CONFIG, half=half, int4_compute_dtype="float32"))
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.weight.requires_grad_(True)
    return model


def make_batch(seed: int, rows: int = GLOBAL_ROWS, vocab: int = 1024) -> dict[str, torch.Tensor]:
    """Rows of one sample each; the first CONTEXT tokens are context, the rest are predicted."""
    g = torch.Generator().manual_seed(seed)
    i32 = torch.int32
    context = torch.zeros(rows, LENGTH, dtype=torch.bool)
    context[:, :CONTEXT] = True
    targets = torch.randint(0, vocab + 2, (rows, LENGTH), generator=g)
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


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor],
              device: torch.device) -> torch.Tensor:
    return model(*(batch[k].to(device) for k in MODEL_INPUTS))[0]


def inference_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Two incremental calls (prompt, then one token), as generation makes them; the second's logits."""
    b = {k: v.to(device) for k, v in batch.items()}
    position = torch.arange(LENGTH, device=device).expand(b["input"].shape[0], LENGTH).to(torch.int32)
    args = [b["input"], b["input_sub"], position, b["context"], b["sample_ids"], b["num_segments"],
            b["segment"], b["segment_rel_offset"], b["segment_rel"], b["ext_table_ids"], b["ext_table_sub"]]
    split = [[a[:, :-1] for a in args[:8]] + args[8:], [a[:, -1:] for a in args[:8]] + args[8:]]
    _, _, past = model.inference(*split[0])
    return model.inference(*split[1], past_key_values=past)[0]


def reference_step(model: CPMBee, optimizer: torch.optim.Optimizer, batch: dict,
                   device: torch.device) -> tuple[float, float]:
    """Plain single-process step on the global batch: loss, pre-clip grad norm."""
    logits = logits_of(model, batch, device)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten().to(logits.device),
                           ignore_index=-100)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_NORM)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach()), float(norm)


def engine_step(engine: Engine, model, optimizer, batch: dict) -> tuple[float, float, bool]:
    """The training loop's step on this rank's rows: loss averaged over ranks, pre-clip norm, stepped."""
    local = rows_of(batch, engine.rank, engine.world_size)
    logits = logits_of(model, local, engine.device)
    loss = engine.cross_entropy(logits, local["targets"].to(engine.device))
    engine.backward(loss)
    norm = engine.clip_grad_norm(MAX_NORM)
    stepped = engine.step(optimizer)
    engine.zero_grad(optimizer)
    return float(engine.all_reduce_mean(loss.detach())), norm, stepped


def local_numel(t: torch.Tensor) -> int:
    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


def trainable_of(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_phase(engine: Engine, out: Path, half: bool) -> dict:
    result: dict = {"rank": engine.rank, "world_size": engine.world_size, "engine": engine.name}
    dev = engine.device

    # (a) sharded forward == unsharded forward; the 4-bit state stays uint8.
    model = build_model(seed=0, half=half)
    reference = copy.deepcopy(model).to(engine.device)
    total_bytes = local_parameter_bytes(reference)
    # recompute is the training loop's default; it must work sharded
    wrapped = engine.wrap(model, blocks=model.encoder.layers, recompute=True)
    # (b) each rank holds about 1/world_size of the parameter bytes.
    result["local_bytes"], result["total_bytes"] = local_parameter_bytes(wrapped), total_bytes
    batch = make_batch(seed=1)
    with torch.no_grad():
        diff = logits_of(wrapped, batch, dev) - logits_of(reference, batch, dev)
        result["forward_max_diff"] = float(diff.abs().max())
        # generation's incremental forward (FSDP2: a registered forward method; bmtrain: use_cache)
        diff = inference_logits(wrapped, batch, dev) - inference_logits(reference, batch, dev)
        result["inference_max_diff"] = float(diff.abs().max())
    q = next(m for m in wrapped.modules() if isinstance(m, Linear4bit))
    result["packed_dtype"] = str(q.weight.dtype)
    result["packed_local_numel"] = local_numel(q.weight)

    # inspection of the sharded model equals the unsharded statistics; integers have no std.
    rows = {r["name"]: r for r in inspect_model(wrapped, engine=engine)}
    ref_rows = {r["name"]: r for r in inspect_model(reference)}
    result["inspect_names_equal"] = sorted(rows) == sorted(ref_rows)
    result["inspect_std_max_diff"] = max(abs(rows[n]["std"] - ref_rows[n]["std"])
                                         for n in ref_rows if ref_rows[n]["std"] is not None)
    result["inspect_int_rows"] = [(rows[n]["dtype"], rows[n]["std"]) for n in rows if rows[n]["dtype"] == "uint8"]
    result["inspect_packed_numel"] = rows[next(n for n in rows if n.endswith("project_q.weight"))]["numel"]

    # (d, 1 -> N) a state dict written by one process loads into the sharded model.
    one_rank = torch.load(out / "one_rank.pt", weights_only=True)
    if engine.name == "bmtrain":  # the 4-bit base loads before wrap; only float parameters after
        try:
            engine.load_state_dict(wrapped, one_rank["state"], strict=True)
            result["full_load_rejected"] = False
        except EngineError:
            result["full_load_rejected"] = True
        names = {n for n, p in reference.named_parameters() if p.is_floating_point()}
        loaded = {k: v for k, v in one_rank["state"].items() if k in names}
        engine.load_state_dict(wrapped, loaded, strict=True)
        reference.load_state_dict(loaded, strict=False)
    else:
        engine.load_state_dict(wrapped, one_rank["state"], strict=True)
        reference.load_state_dict(one_rank["state"], strict=True)
    with torch.no_grad():
        expected = logits_of(reference, batch, dev)
        result["loaded_logits_diff"] = float((logits_of(wrapped, batch, dev) - expected).abs().max())
        if engine.name == "torch":
            result["loaded_matches_file"] = float((expected.cpu() - one_rank["logits"]).abs().max())

    # (c) a few steps on N ranks with 1/N of the rows each == 1 process on all rows.
    optimizer = engine.optimizer(trainable_of(wrapped), lr=LR, weight_decay=WEIGHT_DECAY)
    ref_opt = torch.optim.AdamW(trainable_of(reference), lr=LR, weight_decay=WEIGHT_DECAY)
    result["loss_scale"] = engine.loss_scale
    for key in ("losses", "ref_losses", "norms", "ref_norms", "stepped"):
        result[key] = []
    for step in range(3):
        batch = make_batch(seed=10 + step)
        loss, norm, stepped = engine_step(engine, wrapped, optimizer, batch)
        ref_loss, ref_norm = reference_step(reference, ref_opt, batch, dev)
        for key, value in zip(("losses", "ref_losses", "norms", "ref_norms", "stepped"),
                              (loss, ref_loss, norm, ref_norm, stepped)):
            result[key].append(value)
    trainable = engine.state_dict(wrapped, trainable_only=True)
    ref_trainable = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    if engine.is_main:
        result["trainable_keys_match"] = sorted(trainable) == sorted(ref_trainable)
        result["trained_weights_diff"] = max_diff(trainable, ref_trainable)
        result["weights_moved"] = float((ref_trainable["encoder.output_layernorm.weight"].float() - 1).abs().max())
        result["engine_weights_moved"] = float((trainable["encoder.output_layernorm.weight"].float() - 1).abs().max())
    result["final_loss_scale"] = engine.loss_scale

    # (d, N -> 1) save here; one more step shows what a resumed run must reproduce.
    full = engine.state_dict(wrapped)
    state = engine.training_state(optimizer)
    with torch.no_grad():
        logits = logits_of(wrapped, make_batch(seed=1), dev).cpu()
    if engine.is_main:
        result["full_keys_match"] = sorted(full) == sorted(reference.state_dict())
        result["full_packed_dtype"] = str(full[next(k for k in full if k.endswith("project_q.weight"))].dtype)
        result["trainable_equals_full"] = all(torch.equal(v, full[k]) for k, v in trainable.items())
        save_file({k: v.contiguous() for k, v in full.items()}, out / "sharded_full.safetensors")
        torch.save({"state": state, "logits": logits}, out / "sharded_train.pt")
    result["next_loss"] = engine_step(engine, wrapped, optimizer, make_batch(seed=20))[0]
    after = engine.state_dict(wrapped, trainable_only=True)
    if engine.is_main:
        torch.save({"trainable": after, "loss": result["next_loss"]}, out / "sharded_after.pt")

    # (e) ranks that disagree get a clear error each, not a hang.
    try:
        engine.check_consistent({"dim_model": 64 + engine.rank, "num_layers": 2}, "model config")
        result["inconsistent_error"] = None
    except EngineError as e:
        result["inconsistent_error"] = str(e)
    return result


def resume_phase(engine: Engine, out: Path, half: bool) -> dict:
    """Resume what :func:`train_phase` saved (on another world size) and redo its last step."""
    dev = engine.device
    model = build_model(seed=5, half=half)  # other init: every value must come from the files
    model.load_state_dict(load_file(out / "sharded_full.safetensors"), strict=True)  # base: before wrap
    wrapped = engine.wrap(model, blocks=model.encoder.layers)
    saved = torch.load(out / "sharded_train.pt", weights_only=True)
    after = torch.load(out / "sharded_after.pt", weights_only=True)
    with torch.no_grad():
        logits = logits_of(wrapped, make_batch(seed=1), dev).cpu()
        logits_diff = float((logits - saved["logits"]).abs().max())
    optimizer = engine.optimizer(trainable_of(wrapped), lr=LR, weight_decay=WEIGHT_DECAY)
    engine.load_training_state(optimizer, saved["state"])
    loss = engine_step(engine, wrapped, optimizer, make_batch(seed=20))[0]
    trainable = engine.state_dict(wrapped, trainable_only=True)
    result = {"rank": engine.rank, "world_size": engine.world_size, "logits_diff": logits_diff,
              "loss": loss, "saved_loss": after["loss"]}
    if engine.is_main:
        result["weights_diff"] = max_diff(trainable, after["trainable"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", default="torch", choices=("torch", "bmtrain"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtypes", default="fp32",
                        help="comma-separated model dtypes, each run in DIR/<dtype> (fp16: loss scaling and "
                             "fp32 masters); bmtrain wraps one model per process, so one dtype")
    parser.add_argument("--phase", default="train", choices=("train", "resume"))
    args = parser.parse_args()
    engine = get_engine(args.engine, seed=0, device=args.device)
    phase = train_phase if args.phase == "train" else resume_phase
    for dtype in args.dtypes.split(","):
        out = Path(args.out) / dtype
        result = phase(engine, out, half={"fp32": False, "fp16": True}[dtype])
        engine.barrier()
        (out / f"{args.phase}-rank{engine.rank}.json").write_text(json.dumps(result, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
