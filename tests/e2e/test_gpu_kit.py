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


# ---------------------------------------------------------------- tools/bmtrain_api.py

import io  # noqa: E402
import json  # noqa: E402
import tarfile  # noqa: E402
import textwrap  # noqa: E402

import bmtrain_api  # noqa: E402
import pytest  # noqa: E402

SDIST = REPO / ".whl" / "bmtrain-1.0.1.tar.gz"

FAKE_PACKAGE = {
    "bmtrain/__init__.py": "from .core import Manager, run\nfrom . import core\nconfig = dict(rank=0)\n",
    "bmtrain/core.py": """
        import torch
        from .global_var import config

        class Manager:
            def __init__(self, loss_scale=None, steps=1):
                self.enabled = loss_scale is not None
                setattr(self, "_hidden", 0)

            def step(self):
                config["local_rank"] = 0

        class Adam(torch.optim.Optimizer):
            def __init__(self, params, lr=1e-3):
                super().__init__(params, {"lr": lr})

            def step(self, closure=None, scale=1):
                return closure

        def run(x, *, flag=False):
            return x
    """,
    "bmtrain/global_var.py": "config = {}\n",
}

FAKE_ENGINE = """
    import bmtrain as bmt
    from bmtrain.core import Adam


    class MyAdam(Adam):
        def step(self, closure=None):
            self.param_groups  # torch's: not checked
            return super().step(closure, 2)


    class Engine:
        def __init__(self):
            self._manager: bmt.Manager | None = None

        def manager(self) -> bmt.Manager:
            return self._manager

        def go(self):
            self._manager = bmt.Manager(loss_scale=1, step=2)
            bmt.run(1, flag=True, other=3)
            bmt.run()
            self._manager.enabled, self._manager._hidden, self._manager.missing
            m = self.manager()
            m.step(1)
            bmt.config["local_rank"], bmt.config["nope"]
            bmt.absent()
            MyAdam([], lr=1), MyAdam([], betas=2)
"""


def fake_sdist(tmp_path):
    path = tmp_path / "fake-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in FAKE_PACKAGE.items():
            data = textwrap.dedent(text).encode()
            info = tarfile.TarInfo(f"fake-1.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_api_check_reports_each_kind_of_mismatch(tmp_path):
    engine = tmp_path / "engine.py"
    engine.write_text(textwrap.dedent(FAKE_ENGINE))
    report = bmtrain_api.check(fake_sdist(tmp_path), engine)
    problems = "\n".join(report.problems)
    assert "bmtrain.core.Manager(...): no parameter 'step'" in problems
    assert "bmtrain.core.run(...): no parameter 'other'" in problems
    assert "bmtrain.core.run(...): missing x" in problems
    assert "bmtrain.core.Manager.missing: no such method or attribute" in problems
    assert "bmtrain.core.Manager.step(...): 1 positional arguments, step() takes 0" in problems
    assert "bmtrain.config['nope']: bmtrain never sets this key" in problems
    assert "bmtrain.absent: not defined in bmtrain" in problems
    assert "MyAdam.step overrides bmtrain.core.Adam.step: bmtrain's takes scale" in problems
    assert "bmtrain.core.Adam(...): no parameter 'betas'" in problems  # a subclass without __init__: the base's
    assert len(report.problems) == 9, problems
    # what did check out: attributes set in __init__ or by setattr, config keys bmtrain sets, super() calls
    checked = set(report.checked) - {p.split(": ")[0] for p in report.problems}
    assert {"bmtrain.core.Manager.enabled", "bmtrain.core.Manager._hidden", "bmtrain.config['local_rank']",
            "super().step -> bmtrain.core.Adam.step"} <= checked


@pytest.mark.skipif(not SDIST.is_file(), reason="no .whl/bmtrain-1.0.1.tar.gz (bash tools/gpu_wheels.sh fetches it)")
def test_the_bmtrain_engine_matches_bmtrain_1_0_1():
    report = bmtrain_api.check(SDIST)
    assert report.problems == []
    assert {"bmtrain.init.init_distributed(...)", "bmtrain.optim.optim_manager.OptimManager(...)",
            "bmtrain.optim.optim_manager.OptimManager.clip_grad_norm(...)",
            "bmtrain.optim.adam_offload.AdamOffloadOptimizer.state_dict(...)",
            "super().__init__ -> bmtrain.block_layer.Block.__init__",
            "_AdamOffloadW.step overrides bmtrain.optim.adam_offload.AdamOffloadOptimizer.step"} <= set(report.checked)


# ---------------------------------------------------------------- gpu_kit.py pytest-summary and report

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_a" name="test_ok"/>
<testcase classname="tests.gpu.test_a" name="test_no_gpu"><skipped message="needs a CUDA device"/></testcase>
{extra}</testsuite></testsuites>"""


@pytest.mark.parametrize("extra,expect_skipped,verdict", [
    ("", False, 0),
    ('<testcase classname="t" name="bad"><error message="boom"/></testcase>', False, 1),
    ("", True, 1),  # the dry run: a test that ran instead of being skipped for want of CUDA
])
def test_pytest_summary_verdicts(tmp_path, extra, expect_skipped, verdict):
    xml = tmp_path / "r.xml"
    xml.write_text(JUNIT.format(extra=extra))
    assert gpu_kit.pytest_summary(str(xml), str(tmp_path / "r.json"), expect_skipped) == verdict
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["counts"]["passed"] == 1 and saved["counts"]["skipped"] == 1
    assert saved["tests"]["tests.gpu.test_a::test_no_gpu"]["message"] == "needs a CUDA device"


def test_dry_run_summary_all_skipped_passes(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(JUNIT.format(extra="").replace('<testcase classname="tests.gpu.test_a" name="test_ok"/>', ""))
    assert gpu_kit.pytest_summary(str(xml), str(tmp_path / "r.json"), expect_skipped=True) == 0


def test_report_merges_stages_and_prints_losses(tmp_path, capsys):
    (tmp_path / "stages.tsv").write_text("train_engines\tpass\t12\ttrain_engines.log (exit 0)\n"
                                         "benchmark\ttimeout\t300\tbenchmark.log (exit 124)\n")
    losses = [2.0, 1.8, 1.6, 1.0, 0.9, 0.8]
    (tmp_path / "train.json").write_text(json.dumps({"engines": {
        "torch": {"losses": losses, "steps": 6, "loss_first3_mean": 1.8, "loss_last3_mean": 0.9, "loss_fell": True},
        "bmtrain": {"skipped": "no CUDA here"}}}))
    (tmp_path / "benchmark.log").write_text("[12:00:00]   10B qlora: {'peak_gib': 7.9}\nnoise\n")
    out = tmp_path / "results.json"
    assert gpu_kit.report(str(tmp_path), str(out), dry_run=True) == 1  # one stage timed out
    saved = json.loads(out.read_text())
    assert saved["mode"].startswith("dry run") and [s["status"] for s in saved["stages"]] == ["pass", "timeout"]
    assert saved["headline"]["train_torch"]["loss_fell"] and saved["headline"]["train_bmtrain"] == {
        "skipped": "no CUDA here"}
    assert saved["benchmark_log_lines"] == ["[12:00:00]   10B qlora: {'peak_gib': 7.9}"]
    printed = capsys.readouterr().out
    assert "torch: loss 1.800 -> 0.900" in printed and "fell in 6 steps" in printed
    assert "bmtrain: skipped (no CUDA here)" in printed
