"""bitsandbytes' kernels-community warning is filtered for every entry point; other warnings are kept."""

import subprocess
import sys

from tests.conftest import REPO

ROOT = REPO
SCRIPTS = ["build_format_base.py", "evaluate.py", "export_model.py", "finetune_cpm_bee.py", "finetune_cpm_bee_qlora.py",
           "preprocess_dataset.py", "quantize_state_dict.py", "text_generation.py"]

# Every script's --help and the demo's, in one interpreter (imports once), then bnb's own logger is
# given the filtered message and another one: only the other one may come out.
PROBE = f"""
import logging, runpy, sys
for script in {SCRIPTS!r}:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path({str(ROOT / "src")!r} + "/" + script, run_name="__main__")
    except SystemExit:
        pass
sys.argv = ["cpm_live.demo", "--help"]
try:
    runpy.run_module("cpm_live.demo", run_name="__main__")
except SystemExit:
    pass
import bitsandbytes, cpm_live.layers  # noqa: F401  (the package's bnb imports happened above)
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "probe")
log.warning("some other bitsandbytes warning")
"""


def test_entry_points_do_not_print_the_kernels_community_warning():
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "usage:" in result.stdout  # the scripts did run
    assert "kernels-community" not in output, output[-3000:]
    assert "some other bitsandbytes warning" in result.stderr
