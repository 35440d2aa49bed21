"""Scaling over ranks with the torch engine (FSDP2, gloo on CPU): per-rank bytes and step time.

Launches ``torchrun --standalone --nproc_per_node N benchmarks/scaling_worker.py`` for each N,
alternating the rank counts when repeated, so both see the same machine load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import bench_common as bc


def launch(nproc: int, mode: str, dim: int, layers: int, tokens: int, steps: int, threads: int,
           timeout: float = 900.0) -> dict[str, Any]:
    """One torchrun launch; returns rank 0's record of every rank."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "scaling.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(bc.BENCH_DIR / "scaling_worker.py"), "--mode", mode, "--dim", str(dim), "--layers", str(layers),
               "--tokens", str(tokens), "--steps", str(steps), "--threads", str(threads), "--out", out]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=bc.REPO_ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun --nproc_per_node {nproc} scaling_worker.py failed "
                               f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def run_scaling(mode: str, dim: int, layers: int, tokens: int, steps: int, reps: int, threads: int,
                rank_counts: tuple[int, ...] = (1, 2), log=print) -> dict[str, Any]:
    launches: dict[int, list[dict[str, Any]]] = {n: [] for n in rank_counts}
    for rep in range(reps):
        order = rank_counts if rep % 2 == 0 else tuple(reversed(rank_counts))
        for n in order:
            launches[n].append(launch(n, mode, dim, layers, tokens, steps, threads))
    results = {}
    for n, runs in launches.items():
        ranks = runs[-1]["ranks"]
        # Per launch: the slowest rank's median step (ranks wait for each other at the barrier).
        step = bc.median([max(bc.median(r["step_s"]) for r in run["ranks"]) for run in runs])
        results[str(n)] = {
            "param_bytes_per_rank": [r["param_bytes"] for r in ranks],
            "unsharded_param_bytes": ranks[0]["unsharded_param_bytes"],
            "optimizer_state_bytes_per_rank": [r["optimizer_state_bytes"] for r in ranks],
            "peak_rss_mib_per_rank": [r["peak_rss_bytes"] / bc.MIB for r in ranks],
            "step_s_median": step,
            "tokens_per_s_total": n * tokens / step,
        }
        log(f"  scaling {mode} {n} rank(s): {results[str(n)]['param_bytes_per_rank']} param bytes/rank, "
            f"step {step:.3f} s")
    one, two = results.get("1"), results.get("2")
    summary = {}
    if one and two:
        summary = {
            "param_bytes_per_rank_2_over_1": max(two["param_bytes_per_rank"]) / one["param_bytes_per_rank"][0],
            "step_time_2_over_1": two["step_s_median"] / one["step_s_median"],
            "throughput_2_over_1": two["tokens_per_s_total"] / one["tokens_per_s_total"],
        }
    return {"engine": "cpm_live.engine.get_engine('torch') (FSDP2 fully_shard per block, gloo)",
            "mode": mode, "dim": dim, "layers": layers, "tokens_per_rank": tokens, "threads_per_rank": threads,
            "ranks": results, **summary}
