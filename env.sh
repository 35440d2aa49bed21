# Sourced by demo.sh and test.sh: create (once) and activate .venv with cpm_live installed.
# torch is pinned to the CPU build first so that pip does not pull a multi-GB CUDA build.
set -e
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
# Reinstall when a dependency is missing or a console script names a module that moved (setup.py changed).
if ! python -c "
import importlib.metadata, importlib.util
import cpm_live, torch, bitsandbytes, peft, pytest, xdist
assert all(importlib.util.find_spec(e.module) for e in importlib.metadata.entry_points(group='console_scripts')
           if e.module.startswith('cpm_live.'))" >/dev/null 2>&1; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[test]"
fi
