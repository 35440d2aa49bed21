#!/usr/bin/env bash
# Run the test suite on CPU (sets up .venv on first use). Extra arguments go to pytest.
set -e
. "$(dirname "$0")/env.sh"
ruff check src tests benchmarks tools
python -m pytest -q "$@"
