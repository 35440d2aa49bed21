"""Linear4bit under FSDP2 on two real gloo ranks (this file is also the worker torchrun starts)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpm_live.layers import Linear4bit


def _fsdp_worker() -> None:
    """2 gloo ranks: a sharded Linear4bit stack computes what the full one does, and its state dict gathers."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from cpm_live.checkpoint import CheckpointError, save_state_dict
    from cpm_live.utils import non_plain_tensors

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear4bit(64, 96), Linear4bit(96, 32, quant_type="fp4", double_quant=False))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 64, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    expected_grad, x.grad = x.grad.clone(), None
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    packed = model[0].weight
    assert isinstance(packed, DTensor) and packed.to_local().numel() == 64 * 96 // 2 // 2, packed.to_local().shape
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=0)
    sharded = model.state_dict()
    assert list(sharded) == list(full), list(sharded)
    assert isinstance(sharded["0.weight.absmax"], DTensor)
    gathered = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sharded.items()}
    for key, value in full.items():
        assert torch.equal(gathered[key], value), key
    # Writers know no DTensor, only "not a plain tensor": the shards are refused, the gathered dict is not.
    assert non_plain_tensors(sharded) == [k for k, v in sharded.items() if isinstance(v, DTensor)] != []
    assert non_plain_tensors(gathered) == []
    try:
        save_state_dict(sharded, f"refused{rank}.safetensors")
    except CheckpointError as e:
        assert "DTensor" in str(e) and "Engine.state_dict" in str(e), e
    else:
        raise AssertionError("a sharded state dict was written")
    # Loading a sharded state dict back (DTensors in, DTensors on the module).
    model.load_state_dict(sharded)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    if rank == 0:
        print("FSDP2 OK")
    dist.destroy_process_group()


@pytest.mark.slow
def test_fully_shard_on_two_gloo_ranks(tmp_path):
    root = Path(__file__).parents[1]  # src first: this checkout's package, not an installed one
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", __file__],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "FSDP2 OK" in result.stdout


if __name__ == "__main__":
    _fsdp_worker()
