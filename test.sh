#!/usr/bin/env bash
# Run the test suite on CPU (sets up .venv on first use). Extra arguments go to pytest.
# Two workers by default (the suite is mostly single-threaded; each file stays on one worker so its
# fixtures are built once); PYTEST_WORKERS=0 runs in one process.
set -e
. "$(dirname "$0")/env.sh"
ruff check src tests benchmarks tools
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
