"""``preprocess_dataset.py --format original`` writes datasets that CPM-Bee's own ``DistributedDataset`` reads.

The reader is the original code itself, loaded from a CPM-Bee checkout, not a copy: the team keeps no
third-party code in this repository (Apache-2.0 would allow a copy with its notice; the house rule
does not). Point ``CPM_BEE_REPO`` at a checkout of github.com/OpenBMB/CPM-Bee (a work tree, or a bare
git directory, read at ``CPM_BEE_COMMIT``); without one the comparison with the original skips, and
the format checks below still run. The original module imports bmtrain at the top but only its
multi-rank ``state_dict`` calls it, so an empty stand-in module satisfies the import.
"""

import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cpm_live.data.distributed_dataset import SimpleDataset
from cpm_live.data.preprocess import main as preprocess
from cpm_live.data.serializer import JsonSerializer, PickleSerializer
from tests.conftest import SHARED

CPM_BEE_COMMIT = "95cc575"
ORIGINAL_FILES = ("src/cpm_live/dataset/distributed_dataset.py", "src/cpm_live/dataset/serializer.py")
RECORDS = [{"input": f"passage {i}", "options": {"<option_0>": "a", "<option_1>": "b"}, "<ans>": "<option_1>"}
           for i in range(50)] + [{"input": "中文 and nested", "<ans>": {"a": [1, 2.5, None, True]}}]


def original_sources() -> dict[str, str] | None:
    root = os.environ.get("CPM_BEE_REPO") or next(
        (p for p in (str(SHARED.parent / "CPM-Bee"),) if os.path.isdir(p)), None)
    if root is None:
        return None
    root = Path(root)
    if (root / ORIGINAL_FILES[0]).is_file():
        return {name: (root / name).read_text(encoding="utf-8") for name in ORIGINAL_FILES}
    show = [subprocess.run(["git", "--git-dir", str(root), "show", f"{CPM_BEE_COMMIT}:{name}"], capture_output=True,
                           text=True) for name in ORIGINAL_FILES]
    if any(p.returncode for p in show):
        return None
    return {name: p.stdout for name, p in zip(ORIGINAL_FILES, show)}


def original_dataset_class(sources: dict[str, str], where: Path) -> type:
    """CPM-Bee's ``cpm_live.dataset.distributed_dataset.DistributedDataset``, imported from its own files."""
    package = where / "original_cpm_bee" / "dataset"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    for name, text in sources.items():
        (package / Path(name).name).write_text(text, encoding="utf-8")
    sys.modules.setdefault("bmtrain", types.ModuleType("bmtrain"))
    sys.path.insert(0, str(where))
    try:
        from original_cpm_bee.dataset.distributed_dataset import DistributedDataset
    finally:
        sys.path.remove(str(where))
    return DistributedDataset


def write(tmp_path: Path, fmt: str) -> Path:
    source = tmp_path / "jsonl"
    source.mkdir(parents=True)
    (source / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS),
                                        encoding="utf-8")
    assert preprocess(["--input", str(source), "--output_path", str(tmp_path / "bin"), "--output_name", "ccpm_data",
                       "--format", fmt, "--block_size", "1024"]) == 0
    return tmp_path / "bin" / "train"


def read_all(dataset) -> list:
    records = []
    while True:
        try:
            records.append(dataset.read())
        except EOFError:
            return records


def key(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def test_original_format_is_read_by_cpm_bees_distributed_dataset(tmp_path):
    sources = original_sources()
    if sources is None:
        pytest.skip("no CPM-Bee checkout: set CPM_BEE_REPO to github.com/OpenBMB/CPM-Bee")
    DistributedDataset = original_dataset_class(sources, tmp_path / "code")
    path = write(tmp_path, "original")
    records = read_all(DistributedDataset(str(path), shuffle=False, max_repeat_times=1))
    assert sorted(map(key, records)) == sorted(map(key, RECORDS))
    # The default (JSON) payloads are what the original could not unpickle.
    json_path = write(tmp_path / "json", "json")
    with pytest.raises(pickle.UnpicklingError, match="load key"):
        read_all(DistributedDataset(str(json_path), shuffle=False, max_repeat_times=1))


@pytest.mark.parametrize("fmt, serializer, other", [("original", PickleSerializer, JsonSerializer),
                                                     ("json", JsonSerializer, PickleSerializer)])
def test_both_formats_hold_every_record_and_this_package_reads_them(tmp_path, fmt, serializer, other):
    path = write(tmp_path, fmt)
    with pytest.raises((ValueError, pickle.UnpicklingError)):  # the payloads are really of the chosen kind
        read_all(SimpleDataset(str(path), serializer=other(), shuffle=False))
    records = read_all(SimpleDataset(str(path), serializer=serializer(), shuffle=False))
    assert sorted(map(key, records)) == sorted(map(key, RECORDS))
    assert sorted(map(key, read_all(SimpleDataset(str(path), shuffle=False)))) == sorted(map(key, RECORDS))
