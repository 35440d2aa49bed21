"""Helpers of tools/gpu_check.sh: check the carried wheels, find NCCL for bmtrain, write the report.

    python tools/gpu_kit.py check-wheels .whl      # CPU: everything the GPU run imports is carried or in the image
    python tools/gpu_kit.py nccl                    # GPU: print NCCL_INCLUDE_DIR=... NCCL_LIB_DIR=... for CMake
    python tools/gpu_kit.py pytest-summary XML JSON [--expect-skipped]  # outcomes of pytest's junit XML
    python tools/gpu_kit.py report OUTDIR OUT.json [--dry-run]          # stage table + results into one JSON

Standard library only: ``check-wheels`` runs on a bare CPU machine.
"""

from __future__ import annotations

import ast
import email.parser
import glob
import json
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from gpu_train_check import loss_line

REPO = Path(__file__).resolve().parents[1]
MAX_WHEELS_MIB = 60
# Code that runs on the GPU machine; its third-party imports must all be satisfiable there.
GPU_CODE = ["src/cpm_live", "src/*.py", "tests/gpu", "tests/conftest.py", "tests/tiny_models.py",
            "tests/int8_reference.py", "tests/dist_scripts", "tests/__init__.py", "benchmarks",
            "tools/gpu_train_check.py",
            "tools/gpu_kit.py", "tools/bmtrain_api.py"]
# Import name -> distribution name, where they differ.
IMPORT_TO_DIST = {"rouge_score": "rouge-score", "yaml": "pyyaml", "google": "protobuf", "PIL": "pillow",
                  "sklearn": "scikit-learn"}
# Distributions needed only to build bmtrain from its sdist there.
BUILD_NEEDS = ["setuptools", "wheel", "pybind11", "cmake", "ninja", "numpy"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = (REPO / "tools" / "gpu_image_packages.txt").read_text().splitlines()
    return {normalize(x) for x in lines if x.strip() and not x.startswith("#")}


def wheel_metadata(path: Path) -> tuple[str, list[str]]:
    """(distribution name, unconditional requirements) of a wheel or an sdist."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode()
    else:
        with tarfile.open(path) as t:
            member = next(m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
            text = t.extractfile(member).read().decode()
    msg = email.parser.Parser().parsestr(text)
    requires = [r for r in msg.get_all("Requires-Dist") or [] if "extra ==" not in r]
    return normalize(msg["Name"]), [normalize(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires]


def third_party_imports() -> dict[str, str]:
    """Top-level import names used by the GPU run's code -> one file that imports it."""
    # The repository's own modules (benchmarks/ and tools/ run as scripts, their siblings on sys.path).
    local = {"cpm_live", "tests"} | {p.stem for d in ("benchmarks", "tools") for p in (REPO / d).glob("*.py")}
    found: dict[str, str] = {}
    files: list[Path] = []
    for pattern in GPU_CODE:
        for hit in glob.glob(str(REPO / pattern)):
            p = Path(hit)
            files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, str(f.relative_to(REPO)))
    return found


def planned_wheels() -> set[str]:
    """Distributions tools/gpu_wheels.sh fetches (its ``name==version`` pins)."""
    text = (REPO / "tools" / "gpu_wheels.sh").read_text()
    return {normalize(m) for m in re.findall(r'"([A-Za-z0-9_.-]+)==[0-9][^"]*"', text)}


def missing_on_gpu(available: set[str]) -> list[str]:
    """Third-party imports of the GPU run's code that ``available`` distributions do not provide."""
    return [f"{where} imports {top} ({normalize(IMPORT_TO_DIST.get(top, top))})"
            for top, where in sorted(third_party_imports().items())
            if normalize(IMPORT_TO_DIST.get(top, top)) not in available]


def check_wheels(whl_dir: str) -> int:
    """0 when .whl/ holds what the image lacks, within the size limit; else 1 with the reasons."""
    d = Path(whl_dir)
    problems: list[str] = []
    files = sorted(d.glob("*.whl")) + sorted(d.glob("*.tar.gz")) if d.is_dir() else []
    if not files:
        print(f"{whl_dir}: no wheels; run `bash tools/gpu_wheels.sh` first")
        return 1
    image = image_packages()
    carried: dict[str, list[str]] = {}
    for f in files:
        name, requires = wheel_metadata(f)
        if name in carried:
            problems.append(f"two files for {name} in {whl_dir}: keep one version (pip install stops on two)")
        carried[name] = requires
    available = image | set(carried)
    for name, requires in carried.items():
        problems += [f"{name} needs {r}, which is neither in the image nor in {whl_dir}"
                     for r in requires if r not in available and not r.startswith("nvidia-nccl")]
    problems += [f"{m}, which is neither in the image nor in {whl_dir}" for m in missing_on_gpu(available)]
    problems += [f"building bmtrain needs {b}, which the image lacks" for b in BUILD_NEEDS if b not in image]
    if "bmtrain" not in carried:
        problems.append(f"{whl_dir} lacks bmtrain's sdist (bmtrain-1.0.1.tar.gz)")
    size_mib = sum(f.stat().st_size for f in files) / 2**20
    if size_mib > MAX_WHEELS_MIB:
        problems.append(f"{whl_dir} holds {size_mib:.1f} MiB, over the {MAX_WHEELS_MIB} MiB that may travel")
    for name in sorted(carried):
        print(f"  carried: {name}")
    print(f"{whl_dir}: {len(files)} files, {size_mib:.1f} MiB; {len(image)} packages in the image list")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


def find_nccl() -> int:
    """Print shell assignments for NCCL's headers and library among the installed nvidia-* packages."""
    libs, headers = [], []
    for root in [p for p in sys.path if p and os.path.isdir(p)]:
        libs += glob.glob(os.path.join(root, "nvidia", "**", "libnccl.so*"), recursive=True)
        headers += glob.glob(os.path.join(root, "nvidia", "**", "nccl.h"), recursive=True)
    if not libs:
        print("echo 'no libnccl.so* under any nvidia/ package on sys.path' >&2; false")
        return 1
    print(f"export NCCL_LIB_DIR={os.path.dirname(sorted(libs)[0])}")
    if headers:
        print(f"export NCCL_INCLUDE_DIR={os.path.dirname(sorted(headers)[0])}")
    return 0


NO_CUDA_SKIP = "needs a CUDA device"  # tests/gpu/conftest.py's reason, on a machine without CUDA


def pytest_summary(xml_path: str, json_path: str, expect_skipped: bool = False) -> int:
    """Write each test's outcome and the counts from pytest's junit XML; 0 when the outcomes are a pass.

    On a GPU a pass is at least one test passed and none failed or errored (all skipped means no CUDA
    was seen); in the dry run (``expect_skipped``) every test must be collected and skipped for want of
    CUDA, so that a test that no longer imports fails here, not on the lent machine.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as e:
        Path(json_path).write_text(json.dumps({"error": f"{xml_path}: {e}"}) + "\n")
        print(f"no readable pytest report: {e}")
        return 1
    cases = {}
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome, message = name, (element.get("message") or "")[:300]
                break
        cases[f"{case.get('classname')}::{case.get('name')}"] = {"outcome": outcome, **(
            {"message": message} if message is not None else {})}
    counts: dict[str, int] = {}
    for c in cases.values():
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    Path(json_path).write_text(json.dumps({"counts": counts, "tests": cases}, indent=1) + "\n")
    print(counts)
    if expect_skipped:
        other = [n for n, c in cases.items() if c["outcome"] != "skipped" or NO_CUDA_SKIP not in c.get("message", "")]
        for name in other[:10]:
            print(f"not skipped for want of CUDA: {name}: {cases[name]}")
        return 0 if cases and not other else 1
    return 0 if counts.get("passed") and not counts.get("failed") and not counts.get("error") else 1


def headline(results: dict) -> dict:
    """The numbers the check exists for, flattened: losses, pytest counts, QLoRA/bf16 LoRA, the 10B step."""
    out: dict = {}
    for engine, r in results.get("training", {}).get("engines", {}).items():
        out[f"train_{engine}"] = ({k: r.get(k) for k in ("loss_first3_mean", "loss_last3_mean", "loss_fell",
                                                        "peak_memory_mib_rank0", "tokens_per_s_median")}
                                  if "losses" in r else {k: r[k] for k in ("skipped", "error") if k in r})
    if "counts" in results.get("pytest_gpu", {}):
        out["pytest_gpu"] = results["pytest_gpu"]["counts"]
    bench = results.get("benchmark", {})
    for cfg in bench.get("finetune", {}).get("configs", []):
        modes = cfg.get("modes", {})
        if "qlora" in modes and "lora_bf16" in modes:
            q, b = modes["qlora"], modes["lora_bf16"]
            out[f"finetune_d{cfg['dim']}_L{cfg['layers']}_{cfg['rows']}x{cfg['seqlen']}tok"] = {
                "qlora_tokens_per_s": q["tokens_per_s"], "lora_bf16_tokens_per_s": b["tokens_per_s"],
                "qlora_over_lora_bf16_time_paired": cfg["ratios"].get("qlora_over_lora_bf16_time"),
                "qlora_peak_mib": q["peak_mib"], "lora_bf16_peak_mib": b["peak_mib"],
            }
    m10 = bench.get("measured_10b", {})
    for mode in ("qlora", "lora_bf16"):
        if isinstance(m10.get(mode), dict):
            out[f"cpm_bee_10b_{mode}"] = {k: m10[mode].get(k) for k in (
                "peak_gib", "estimated_peak_gib", "peak_over_estimate", "step_s_median", "tokens_per_s", "error")
                if k in m10[mode]}
    return out


def report(outdir: str, out_json: str, dry_run: bool = False) -> int:
    """Merge the stage table and each stage's JSON into one results file; print the summary.

    0 when every stage passed (the dry run's pass: every stage ran its CPU part)."""
    out = Path(outdir)
    stages = []
    for line in (out / "stages.tsv").read_text().splitlines():
        name, status, seconds, log = line.split("\t")
        stages.append({"stage": name, "status": status, "seconds": int(seconds), "log": log})
    results: dict = {"mode": "dry run on CPU, tiny sizes (tools/gpu_check.sh --dry-run)" if dry_run else "GPU",
                     "stages": stages}
    for key, file in (("environment", "env.json"), ("training", "train.json"), ("benchmark", "bench-gpu.json"),
                      ("pytest_gpu", "pytest-gpu.json")):
        path = out / file
        if path.exists():
            try:
                results[key] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                results[key] = {"unreadable": f"{file}: {e}"}
    log = out / "benchmark.log"
    if "benchmark" not in results and log.exists():
        # The section was cut by the time budget before its JSON was written: keep the lines it had
        # logged, marked as read from the log.
        results["benchmark_log_lines"] = [line for line in log.read_text().splitlines()
                                          if "finetune d=" in line or "ratios" in line or "10B" in line]
    results["recorded"] = "written by tools/gpu_kit.py report from the stage logs of tools/gpu_check.sh"
    results["headline"] = headline(results)
    Path(out_json).write_text(json.dumps(results, indent=1) + "\n")
    width = max([len(s["stage"]) for s in stages] + [5])
    total = sum(s["seconds"] for s in stages)
    print(f"\n== GPU check summary ({results['mode']}) ==")
    print(f"{'stage':<{width}}  {'status':<8} {'seconds':>7}   log")
    for s in stages:
        print(f"{s['stage']:<{width}}  {s['status']:<8} {s['seconds']:>7}   {s['log']}")
    print(f"{'total':<{width}}  {'':<8} {total:>7}")
    for engine, r in results.get("training", {}).get("engines", {}).items():
        print(loss_line(engine, r))
    for k, v in results["headline"].items():
        if not k.startswith("train_"):
            print(f"{k}: {json.dumps(v)}")
    print(f"results: {out_json}")
    return 0 if stages and all(s["status"] == "pass" for s in stages) else 1


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "check-wheels":
        return check_wheels(sys.argv[2])
    if len(sys.argv) == 2 and sys.argv[1] == "nccl":
        return find_nccl()
    if len(sys.argv) in (4, 5) and sys.argv[1] == "pytest-summary" and sys.argv[4:] in ([], ["--expect-skipped"]):
        return pytest_summary(sys.argv[2], sys.argv[3], expect_skipped=len(sys.argv) == 5)
    if len(sys.argv) in (4, 5) and sys.argv[1] == "report" and sys.argv[4:] in ([], ["--dry-run"]):
        return report(sys.argv[2], sys.argv[3], dry_run=len(sys.argv) == 5)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
