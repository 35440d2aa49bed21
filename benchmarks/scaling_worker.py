"""torchrun worker of bench_scaling: per-rank parameter bytes and step time under the torch engine.

    torchrun --standalone --nproc_per_node 2 benchmarks/scaling_worker.py --mode qlora --out r.json

Each rank trains on its own micro-batch of ``--tokens`` tokens (weak scaling). The engine shards
every parameter with FSDP2 (gloo on CPU), the 4-bit state included; rank 0 writes one JSON record
with every rank's numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import bench_common as bc
import torch

from cpm_live.data.tensors import IGNORE_INDEX


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("qlora", "lora_fp32", "full"), default="qlora")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    bc.quiet()
    torch.set_num_threads(args.threads)

    from cpm_live.engine import get_engine, local_parameter_bytes
    from cpm_live.lora import LoraSettings, add_lora
    from cpm_live.models import CPMBee
    from cpm_live.utils import atomic_write_text

    engine = get_engine("torch", device="cpu", seed=1234)
    model = CPMBee(bc.model_config(args.dim, args.layers, int4=args.mode == "qlora"))
    if args.mode != "full":
        add_lora(model, LoraSettings())
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = engine.wrap(model, blocks=model.encoder.layers)
    optimizer = engine.optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows, seqlen = bc.batch_shape(args.tokens)
    batch, target = bc.make_batch(rows, seqlen, bc.BENCH_VOCAB, "cpu", seed=engine.rank)

    def step() -> None:
        logits, _ = model(**batch.forward_kwargs())
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                                                 ignore_index=IGNORE_INDEX)
        engine.backward(loss)
        engine.step(optimizer)
        engine.zero_grad(optimizer)

    step()  # warm-up; also allocates the optimizer state
    times = []
    for _ in range(args.steps):
        engine.barrier()
        start = time.perf_counter()
        step()
        engine.barrier()
        times.append(time.perf_counter() - start)
    optimizer_bytes = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
                          for state in optimizer.state.values() for t in state.values()
                          if isinstance(t, torch.Tensor) and t.dim() > 0)
    record = {"rank": engine.rank, "param_bytes": local_parameter_bytes(model), "unsharded_param_bytes": full_bytes,
              "optimizer_state_bytes": optimizer_bytes, "step_s": times, "peak_rss_bytes": bc.rss_bytes()[1]}
    records = engine.all_gather_object(record)
    if engine.is_main:
        atomic_write_text(args.out, json.dumps({"world_size": engine.world_size, "ranks": records}))
    engine.close()


if __name__ == "__main__":
    main()
