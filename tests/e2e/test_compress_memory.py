"""Quantizing a checkpoint holds about one tensor, not the checkpoint: peak memory of fresh processes."""

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.unit.convert.test_compress import LAYER

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from cpm_live.convert.cli import main

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set, so only quantizing counts
    base = status("VmRSS:")
    start = time.perf_counter()
    main(sys.argv[1:])
    seconds = time.perf_counter() - start
    print(json.dumps({"base": base, "peak": status("VmHWM:"), "seconds": seconds}))
""")



def quantize_in_fresh_process(tmp_path: Path, layers: int, workers: int) -> tuple[int, int, float, int]:
    """Write a .pt of ``7 * layers + 1`` fp16 1024 x 1024 tensors, quantize it in a new process.

    Returns (input bytes, output bytes, seconds, resident-set peak above the RSS after imports).
    """
    sd = OrderedDict()
    g = torch.Generator().manual_seed(layers)
    for n in range(layers):
        for name in LAYER:
            sd[f"encoder.layers.{n}.{name}.weight"] = torch.randn(1024, 1024, generator=g).half()
    sd["input_embedding.weight"] = torch.randn(1024, 1024, generator=g).half()
    path = tmp_path / f"big{layers}.pt"
    torch.save(sd, path)
    del sd
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    out = tmp_path / f"big{layers}-int4.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    result = subprocess.run([sys.executable, str(script), "--input-path", str(path), "--output-path", str(out),
                             "--device", "cpu", "--workers", str(workers)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    return path.stat().st_size, out.stat().st_size, stats["seconds"], stats["peak"] - stats["base"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("workers", [1, 2])
def test_peak_memory_does_not_grow_with_the_checkpoint(tmp_path, workers):
    """fp16 .pt checkpoints of 2 MB tensors, 44 and 170 MB: quantizing must not hold the checkpoint.

    Measured in a fresh process: resident-set peak after imports (VmHWM reset through clear_refs).
    With one worker it is a fixed ~30 MB (first-call initialisation) plus ~10x the largest tensor
    (bnb's CPU kernel works in fp32/int32 temporaries): ~50 MB for both sizes. Each further worker
    adds its own temporaries and malloc arena (2 workers: 60-110 MB, measured), per worker, not per
    tensor. The .pt path is the one to watch: it is memory-mapped, and pages of consumed tensors
    must be handed back.
    """
    small, _, _, small_peak = quantize_in_fresh_process(tmp_path, 3, workers)
    big, out_size, seconds, big_peak = quantize_in_fresh_process(tmp_path, 12, workers)
    print(f"\n{workers} worker(s): {big / 1e6:.0f} MB -> {out_size / 1e6:.0f} MB at {big / 1e6 / seconds:.1f} MB/s; "
          f"peak RSS +{small_peak / 1e6:.0f} MB for {small / 1e6:.0f} MB, +{big_peak / 1e6:.0f} MB for "
          f"{big / 1e6:.0f} MB")
    assert big_peak - small_peak < (big - small) / 3, "peak RSS grows with the checkpoint"
    assert big_peak < big, f"peak RSS grew by {big_peak / 1e6:.0f} MB for a {big / 1e6:.0f} MB checkpoint"
    assert out_size / big < 0.3
