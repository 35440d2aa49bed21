#!/usr/bin/env bash
# The one command to run on a lent GPU machine (see docs/gpu_check.md); on CPU, --dry-run checks the kit.
#
#   bash tools/gpu_wheels.sh                 # on a CPU machine with pip: fills .whl/ (git-ignored)
#   bash tools/gpu_check.sh --dry-run        # on CPU: .whl/ is complete and small enough, stages parse
#   bash tools/gpu_check.sh [OUTDIR]         # on the GPU machine, next to the carried .whl/ (default gpu_out/)
#
# Stages (each logged to OUTDIR/<stage>.log, each stopped at what is left of the time budget, a failed
# stage does not stop the next): install the wheels into a target dir, build bmtrain for sm_75/80/90
# from its sdist, print the environment, QLoRA training through torchrun with --engine bmtrain and
# --engine torch, pytest tests/gpu, the GPU benchmark. Then benchmarks/results-gpu.json (also copied
# to OUTDIR) and one summary table. GPU_CHECK_BUDGET_S (default 520) bounds the whole run.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
OUTDIR=gpu_out
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n 2,14p "$0"; exit 0 ;;
        *) OUTDIR=$arg ;;
    esac
done
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-520}
START=$(date +%s)

if [ "$DRY" = 1 ]; then
    status=0
    bash -n "$0" || status=1
    "$PY" -m py_compile tools/gpu_kit.py tools/gpu_train_check.py benchmarks/run.py || status=1
    "$PY" tools/gpu_kit.py check-wheels .whl || status=1
    if [ "$status" = 0 ]; then echo "dry run: the kit is ready"; else echo "dry run: NOT ready"; fi
    exit "$status"
fi

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
: > "$OUTDIR/stages.tsv"
SITE=/tmp/cpm-live-gpu-site
export PYTHONPATH="$SITE:$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME MAX_SECONDS COMMAND...: run with a timeout of min(MAX_SECONDS, time left), record the result.
stage() {
    local name=$1 max=$2; shift 2
    local limit t0 rc status
    limit=$(left)
    [ "$limit" -gt "$max" ] && limit=$max
    if [ "$limit" -lt 10 ]; then
        printf '%s\tskipped\t0\tout of time budget\n' "$name" >> "$OUTDIR/stages.tsv"
        echo "== $name: skipped (time budget spent)"
        return
    fi
    echo "== $name (up to ${limit} s) $(date +%T)"
    t0=$(date +%s)
    # bash -c so that a stage may be one of the functions below (exported with export -f).
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=pass ;;
        124|137) status=timeout ;;
        *) status=fail ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$name.log (exit $rc)" >> "$OUTDIR/stages.tsv"
    echo "   $status (exit $rc) in $(( $(date +%s) - t0 )) s; last lines:"
    tail -n 4 "$OUTDIR/$name.log" | sed 's/^/   | /'
}

install_wheels() {
    rm -rf "$SITE" && mkdir -p "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
    "$PY" -c "import bitsandbytes, jsonlines, rouge_score; print('bitsandbytes', bitsandbytes.__version__)"
}

build_bmtrain() {
    local src=/tmp/cpm-live-bmtrain
    rm -rf "$src" && mkdir -p "$src"
    tar xzf .whl/bmtrain-1.0.1.tar.gz -C "$src" --strip-components 1
    # CUDA 13's nvcc rejects the hard-coded sm_61..72 targets: build for 75;80;90 (H100/H200 are sm_90).
    sed -i -e 's/"61;62;70;72;75;80"/"75;80;90"/g' \
        -e 's/-gencode=arch=compute_61,code=sm_61 -gencode=arch=compute_62,code=sm_62 -gencode=arch=compute_70,code=sm_70 -gencode=arch=compute_72,code=sm_72 /-gencode=arch=compute_90,code=sm_90 /' \
        "$src/CMakeLists.txt"
    grep -n "ARCHITECTURES\|gencode" "$src/CMakeLists.txt"
    eval "$("$PY" tools/gpu_kit.py nccl)" || return 1
    echo "NCCL_LIB_DIR=${NCCL_LIB_DIR:-} NCCL_INCLUDE_DIR=${NCCL_INCLUDE_DIR:-}"
    export LD_LIBRARY_PATH="$NCCL_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    (cd "$src" && MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 \
        "$PY" -m pip wheel -v --no-deps --no-build-isolation --no-index -w /tmp/cpm-live-bmtrain-wheel .) || return 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" /tmp/cpm-live-bmtrain-wheel/bmtrain-*.whl \
        || return 1
    "$PY" -c "import torch, bmtrain; print('bmtrain imported from', bmtrain.__file__)"
}

environment() {
    nvidia-smi || true
    lscpu | grep -E "Model name|^CPU\(s\)" || true
    "$PY" - "$OUTDIR/env.json" <<'PYEOF'
import importlib, json, platform, subprocess, sys
import torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "gpu_count": torch.cuda.device_count(),
       "capability": list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None}
try:
    env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
except (AttributeError, RuntimeError) as e:
    env["nccl"] = f"unknown: {e}"
for name in ("bitsandbytes", "bmtrain", "peft", "safetensors", "numpy", "transformers"):
    try:
        mod = importlib.import_module(name)
        env[name] = getattr(mod, "__version__", "imported (no __version__)")
    except Exception as e:  # a missing package is a finding, not a crash of this stage
        env[name] = f"not importable: {e}"
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                   capture_output=True, text=True).stdout.strip()
except OSError:
    pass
print(json.dumps(env, indent=1))
json.dump(env, open(sys.argv[1], "w"), indent=1)
PYEOF
}

run_pytest() {
    "$PY" -m pytest tests/gpu -q -p no:cacheprovider -rA --junitxml="$OUTDIR/pytest-gpu.xml"
    local rc=$?
    "$PY" - "$OUTDIR/pytest-gpu.xml" "$OUTDIR/pytest-gpu.json" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
try:
    suite = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    json.dump({"error": str(e)}, open(sys.argv[2], "w")); sys.exit()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
cases = {}
for case in suite.iter("testcase"):
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
        el = case.find(tag)
        if el is not None:
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            cases[f"{case.get('classname')}::{case.get('name')}"] = {"outcome": outcome,
                                                                      "message": (el.get("message") or "")[:300]}
            break
    else:
        cases[f"{case.get('classname')}::{case.get('name')}"] = {"outcome": outcome}
counts = {}
for c in cases.values():
    counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
json.dump({"counts": counts, "tests": cases}, open(sys.argv[2], "w"), indent=1)
print(counts)
sys.exit(0 if counts.get("passed") else 1)  # all skipped (no CUDA seen) is not a pass
PYEOF
    local seen=$?
    [ $rc -eq 0 ] && return $seen
    return $rc
}

export PY SITE OUTDIR REPO
export -f install_wheels build_bmtrain environment run_pytest
echo "GPU check: budget ${BUDGET} s, results in $OUTDIR"
stage wheels 60 install_wheels
stage bmtrain_build 200 build_bmtrain
# bmtrain's extension links libnccl.so.2, which the image has inside its nvidia-nccl package.
eval "$("$PY" tools/gpu_kit.py nccl)" && export LD_LIBRARY_PATH="$NCCL_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
stage environment 30 environment
stage train_engines 150 "$PY" tools/gpu_train_check.py --out "$OUTDIR/train.json" --steps 40
stage pytest_gpu 240 run_pytest
stage benchmark 600 "$PY" benchmarks/run.py --device cuda --quick --sections measured_10b,finetune \
    --out "$OUTDIR/bench-gpu.json"
"$PY" tools/gpu_kit.py report "$OUTDIR" benchmarks/results-gpu.json
status=$?
cp benchmarks/results-gpu.json "$OUTDIR/results-gpu.json"
echo "total $(( $(date +%s) - START )) s of the ${BUDGET} s budget"
exit $status
