"""2-rank checks of an int8 base with LoRA under an engine (run by torchrun; see tests/e2e/test_int8_multiprocess.py
and tests/gpu/test_int8_gpu.py): sharded forward == unsharded, the int8 weights stay int8 and are split
between ranks, and LoRA steps on N ranks with 1/N of the rows each == 1 process on all rows."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from cpm_live.engine import get_engine, local_parameter_bytes
from cpm_live.layers import Linear8bit
from cpm_live.lora import LoraSettings, add_lora
from cpm_live.models import CPMBee, CPMBeeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # torchrun runs this file as a script
from tests.dist_scripts.engine_checks import (  # noqa: E402
    CONFIG,
    LR,
    WEIGHT_DECAY,
    engine_step,
    local_numel,
    logits_of,
    make_batch,
    reference_step,
    trainable_of,
)


def build_model(seed: int) -> CPMBee:
    """Tiny int8 CPMBee (threshold 6) with LoRA on q, v and w_1: only the adapters train."""
    torch.manual_seed(seed)
    model = CPMBee(CPMBeeConfig.from_json_file(CONFIG, int4=False, int8=True))
    add_lora(model, LoraSettings(r=4, alpha=8, targets=("project_q", "project_v", "w_1")))
    with torch.no_grad():  # B = 0 at init would make the first forward blind to the adapters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", default="torch", choices=("torch", "bmtrain"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    engine = get_engine(args.engine, seed=0, device=args.device)
    dev = engine.device
    result: dict = {"rank": engine.rank, "world_size": engine.world_size}
    model = build_model(seed=0)
    reference = copy.deepcopy(model).to(dev)
    result["total_bytes"] = local_parameter_bytes(reference)
    wrapped = engine.wrap(model, blocks=model.encoder.layers, recompute=True)
    result["local_bytes"] = local_parameter_bytes(wrapped)
    batch = make_batch(seed=1)
    with torch.no_grad():
        result["forward_max_diff"] = float((logits_of(wrapped, batch, dev) - logits_of(reference, batch, dev))
                                           .abs().max())
    q = next(m for m in wrapped.modules() if isinstance(m, Linear8bit))
    result["weight_dtype"], result["scb_dtype"] = str(q.weight.dtype), str(q.SCB.dtype)
    result["weight_local_numel"], result["weight_numel"] = local_numel(q.weight), q.dim_out * q.dim_in
    optimizer = engine.optimizer(trainable_of(wrapped), lr=LR, weight_decay=WEIGHT_DECAY)
    ref_opt = torch.optim.AdamW(trainable_of(reference), lr=LR, weight_decay=WEIGHT_DECAY)
    result["losses"], result["ref_losses"] = [], []
    for step in range(3):
        batch = make_batch(seed=10 + step)
        result["losses"].append(engine_step(engine, wrapped, optimizer, batch)[0])
        result["ref_losses"].append(reference_step(reference, ref_opt, batch, dev)[0])
    full = engine.state_dict(wrapped)  # gathered on rank 0, {} elsewhere
    if engine.is_main:
        ref_state = reference.state_dict()
        result["state_keys_equal"] = sorted(full) == sorted(ref_state)
        frozen = [k for k in ref_state if ref_state[k].dtype == torch.int8 or k.endswith("SCB")]
        result["int8_state_equal"] = bool(frozen) and all(torch.equal(full[k].cpu(), ref_state[k].cpu())
                                                          for k in frozen)
    engine.barrier()
    Path(args.out, f"int8-rank{engine.rank}.json").write_text(json.dumps(result, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
