"""The GPU kit (tools/gpu_check.sh) stays complete as the code grows: checked here, on CPU, so a new
dependency is caught before a lent GPU machine's minutes are spent finding it."""

import subprocess
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

import gpu_kit  # noqa: E402


def test_every_import_of_the_gpu_run_is_in_the_image_or_carried():
    planned = gpu_kit.planned_wheels()
    assert {"bitsandbytes", "jsonlines", "rouge-score", "bmtrain"} <= planned
    assert gpu_kit.missing_on_gpu(gpu_kit.image_packages() | planned) == []


def test_a_missing_dependency_is_reported():
    missing = gpu_kit.missing_on_gpu(gpu_kit.image_packages())  # nothing carried
    assert any("bitsandbytes" in m for m in missing) and any("jsonlines" in m for m in missing)


def test_the_check_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "tools" / "gpu_check.sh")]).returncode == 0
