#!/usr/bin/env bash
# The one command to run on a lent GPU machine (docs/gpu_check.md); --dry-run runs the same stages on CPU.
#
#   bash tools/gpu_wheels.sh                    # on a CPU machine with pip: fills .whl/ (git-ignored)
#   bash tools/gpu_check.sh --dry-run [OUTDIR]  # on CPU, tiny sizes (default OUTDIR gpu_out/dry-run; sets up .venv)
#   bash tools/gpu_check.sh [OUTDIR]            # on the GPU machine, next to the carried .whl/ (default gpu_out/)
#
# Stages, each logged to OUTDIR/<stage>.log and stopped at its own limit or at what is left of the time
# budget less what the later stages are kept (a failed stage does not stop the next):
#   wheels         .whl/ is complete for the image (gpu_kit.py check-wheels); the wheels install and import
#   bmtrain_build  bmtrain 1.0.1 from its sdist for sm_75/80/90 (dry run: unpacked and patched; no nvcc)
#   bmtrain_api    every bmtrain use of the engine checked against that source (tools/bmtrain_api.py)
#   environment    GPU, driver, torch/CUDA/NCCL, package versions (env.json)
#   train_engines  QLoRA from the demo's format-trained base, --engine bmtrain and --engine torch, same
#                  data and seed (dry run: torch on CPU; bmtrain must stop at its "needs CUDA" line)
#   pytest_gpu     pytest tests/gpu (dry run: every test collected and skipped for want of CUDA)
#   benchmark      QLoRA vs bf16 LoRA in 2048-token rows, one CPM-Bee-10B QLoRA step next to its estimate
#                  (dry run: the same code at tiny sizes)
# Then the results JSON (GPU: benchmarks/results-gpu.json, copied to OUTDIR; dry run: OUTDIR only) and one
# summary: the stage table, each engine's loss, the headline numbers. GPU_CHECK_BUDGET_S bounds the run
# (default 520 s on GPU, 7200 s for the dry run). Exit status 0 only when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
OUTDIR=
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n 2,21p "$0"; exit 0 ;;
        -*) echo "error: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) OUTDIR=$arg ;;
    esac
done
if [ "$DRY" = 1 ]; then
    OUTDIR=${OUTDIR:-gpu_out/dry-run}
    BUDGET=${GPU_CHECK_BUDGET_S:-7200}
    if [ -z "${PYTHON:-}" ]; then
        . "$REPO/env.sh" || { echo "error: could not set up .venv (env.sh)" >&2; exit 1; }
        set +e  # env.sh sets -e; here a failed stage must not stop the next
        PYTHON=python
    fi
else
    OUTDIR=${OUTDIR:-gpu_out}
    BUDGET=${GPU_CHECK_BUDGET_S:-520}
fi
PY=${PYTHON:-python3}
START=$(date +%s)
if [ ! -d .whl ]; then
    echo "error: no .whl/ here; run \`bash tools/gpu_wheels.sh\` first (and carry .whl to the GPU machine)" >&2
    exit 1
fi

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
: > "$OUTDIR/stages.tsv"
SITE=$OUTDIR/site
export PYTHONPATH="$SITE:$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME GPU_MAX DRY_MAX KEEP COMMAND...: run COMMAND with a timeout of the smaller of its own limit
# (GPU_MAX seconds, DRY_MAX in the dry run) and the budget left less KEEP seconds kept for later stages.
stage() {
    local name=$1 max=$2 keep=$4
    [ "$DRY" = 1 ] && max=$3
    shift 4
    local limit t0 rc status
    limit=$(( $(left) - keep ))
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
    "$PY" tools/gpu_kit.py check-wheels .whl || return 1
    rm -rf "$SITE" && mkdir -p "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || return 1
    "$PY" -c "import bitsandbytes as b, jsonlines, rouge_score; print('bitsandbytes', b.__version__, 'from', b.__file__)"
}

build_bmtrain() {
    local src=$OUTDIR/bmtrain-src
    rm -rf "$src" && mkdir -p "$src"
    tar xzf .whl/bmtrain-1.0.1.tar.gz -C "$src" --strip-components 1 || return 1
    # CUDA 13's nvcc rejects the hard-coded sm_61..72 targets: build for 75;80;90 (H100/H200 are sm_90).
    sed -i -e 's/"61;62;70;72;75;80"/"75;80;90"/g' \
        -e 's/-gencode=arch=compute_61,code=sm_61 -gencode=arch=compute_62,code=sm_62 -gencode=arch=compute_70,code=sm_70 -gencode=arch=compute_72,code=sm_72 /-gencode=arch=compute_90,code=sm_90 /' \
        "$src/CMakeLists.txt"
    grep -n "ARCHITECTURES\|gencode" "$src/CMakeLists.txt"
    if grep -qE 'compute_(61|62|70|72)|"61;' "$src/CMakeLists.txt" || ! grep -q 'compute_90' "$src/CMakeLists.txt"; then
        echo "CMakeLists.txt was not patched to sm_75/80/90 (did the sdist change?)"
        return 1
    fi
    if [ "$DRY" = 1 ]; then
        echo "sources unpacked and patched for sm_75/80/90 in $src; the compile needs nvcc and runs on the GPU machine"
        return 0
    fi
    eval "$("$PY" tools/gpu_kit.py nccl)" || return 1
    echo "NCCL_LIB_DIR=${NCCL_LIB_DIR:-} NCCL_INCLUDE_DIR=${NCCL_INCLUDE_DIR:-}"
    export LD_LIBRARY_PATH="$NCCL_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    (cd "$src" && MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 \
        "$PY" -m pip wheel -v --no-deps --no-build-isolation --no-index -w "$OUTDIR/bmtrain-wheel" .) || return 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$OUTDIR"/bmtrain-wheel/bmtrain-*.whl \
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
    "$PY" tools/gpu_kit.py pytest-summary "$OUTDIR/pytest-gpu.xml" "$OUTDIR/pytest-gpu.json" \
        $([ "$DRY" = 1 ] && echo --expect-skipped)
    local verdict=$?
    # pytest exits 0 (all passed) or 5 (nothing ran: every test skipped, expected in the dry run only)
    [ $rc -eq 0 ] || { [ "$DRY" = 1 ] && [ $rc -eq 5 ]; } || return $rc
    return $verdict
}

export PY SITE OUTDIR REPO DRY
export -f install_wheels build_bmtrain environment run_pytest
if [ "$DRY" = 1 ]; then
    echo "GPU check, DRY RUN on CPU (tiny sizes): budget ${BUDGET} s, results in $OUTDIR"
    TRAIN=(--device cpu --base-steps 300 --steps 30)
    BENCH=(--device cpu --tiny --bf16)
else
    echo "GPU check: budget ${BUDGET} s, results in $OUTDIR"
    TRAIN=(--device cuda)
    BENCH=(--device cuda --quick --sections measured_10b,finetune)
fi
# Limits: on the GPU machine each stage's typical time with room (docs/gpu_check.md); in the dry run only
# a guard against a hang (a shared 2-core machine has taken 50 s to import torch).
#     name           GPU   dry  keep
stage wheels          60   900  400 install_wheels
stage bmtrain_build  150   300  360 build_bmtrain
stage bmtrain_api     20   300  300 "$PY" tools/bmtrain_api.py .whl/bmtrain-1.0.1.tar.gz
if [ "$DRY" = 0 ]; then
    # bmtrain's extension links libnccl.so.2, which the image has inside its nvidia-nccl package.
    eval "$("$PY" tools/gpu_kit.py nccl)" && export LD_LIBRARY_PATH="$NCCL_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
stage environment     30   600  300 environment
stage train_engines  150  1800  240 "$PY" tools/gpu_train_check.py --out "$OUTDIR/train.json" \
    --workdir "$OUTDIR/train" "${TRAIN[@]}"
stage pytest_gpu     240   900  120 run_pytest
stage benchmark      300  1800    0 "$PY" benchmarks/run.py "${BENCH[@]}" --out "$OUTDIR/bench-gpu.json"
if [ "$DRY" = 1 ]; then
    "$PY" tools/gpu_kit.py report "$OUTDIR" "$OUTDIR/results-gpu.json" --dry-run
    status=$?
else
    "$PY" tools/gpu_kit.py report "$OUTDIR" benchmarks/results-gpu.json
    status=$?
    cp benchmarks/results-gpu.json "$OUTDIR/results-gpu.json"
fi
echo "total $(( $(date +%s) - START )) s of the ${BUDGET} s budget"
exit $status
