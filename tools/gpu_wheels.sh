#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the lent GPU image lacks, so tools/gpu_check.sh runs there with
# no network: Python 3.12 manylinux wheels, pure-Python wheels built here, and bmtrain's sdist (the
# GPU image builds it for sm_90; bmtrain publishes no cp312 wheel). Run on a CPU machine with pip.
# The image's own package list is in ../shared/GPU.md; tools/gpu_check.sh --dry-run checks the result.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PY=${PYTHON:-python3}

# Binary wheels for the GPU machine's interpreter (CPython 3.12, x86-64 manylinux).
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
WHEELS=(
    "bitsandbytes==0.50.2"   # 4-bit/8-bit kernels (CUDA libraries ship inside the wheel)
    "jsonlines==4.0.0"       # data files
    "nltk==3.10.4"           # needed by rouge-score (its other needs are in the image)
    "defusedxml==0.7.1"      # needed by nltk
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

# A throwaway build environment (setuptools + wheel) for the two packages that come as sources.
BUILD_ENV=$(mktemp -d)
trap 'rm -rf "$BUILD_ENV"' EXIT
"$PY" -m venv "$BUILD_ENV"
"$BUILD_ENV/bin/python" -m pip install -q setuptools wheel
BPY="$BUILD_ENV/bin/python"

# rouge-score 0.1.2 is published as an sdist only; it is pure Python, so a wheel built here works there.
if ! ls "$DEST"/rouge_score-0.1.2-*.whl >/dev/null 2>&1; then
    "$BPY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "rouge-score==0.1.2"
fi

# bmtrain 1.0.1 as its source: pip download would build its metadata in an isolated environment whose
# build requirements (nvidia-nccl-cu11) have no wheel here, so take it without isolation.
if [ ! -f "$DEST/bmtrain-1.0.1.tar.gz" ]; then
    "$BPY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$DEST" "bmtrain==1.0.1"
fi

ls -l "$DEST"
du -sh "$DEST"
