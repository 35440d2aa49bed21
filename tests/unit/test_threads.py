"""Every entry point's CPU thread count (``utils.set_cpu_threads``), checked in fresh processes: the
environment and torch's default are read at import."""

import os
import subprocess
import sys

import pytest

CORES = len(os.sched_getaffinity(0))
PROBE = ("import torch; from cpm_live.utils import set_cpu_threads; {before}"
         "print(set_cpu_threads({preferred}), torch.get_num_threads())")


def threads(env: dict[str, str], preferred: str = "", before: str = "") -> tuple[int, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                              "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(preferred=preferred, before=before)],
                         env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True).stdout
    returned, in_use = map(int, out.split())
    assert returned == in_use
    return returned, in_use


def test_the_users_choice_stands():
    assert threads({"OMP_NUM_THREADS": "1"})[1] == 1
    assert threads({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "8"}, preferred="3")[1] == 1
    assert threads({}, before="torch.set_num_threads(1); ")[1] == 1


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to tell the rules apart")
def test_cores_are_shared_among_the_ranks_of_a_node():
    assert threads({})[1] == CORES
    assert threads({"LOCAL_WORLD_SIZE": "2"})[1] == CORES // 2
    assert threads({"LOCAL_WORLD_SIZE": str(CORES * 4)})[1] == 1
    assert threads({}, preferred="1")[1] == 1
    assert threads({}, preferred=str(CORES * 4))[1] == CORES
