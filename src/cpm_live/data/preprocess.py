"""Convert a folder of `.jsonl` files into shuffled CPM-Bee binary datasets (JSON records).

For each file `X.ext` in `--input` this writes the dataset `OUTPUT_PATH/X/` with data file
`OUTPUT_NAME` (plus `meta.bin`), like the original `src/preprocess_dataset.py`. Records are JSON by
default (read here without unpickling anything); `--format original` stores them as pickles, as
the original did, so teams still running CPM-Bee's own training code can read the output.
The datasets appear only once every file has converted; a bad record stops the run naming its file
and line and leaves no output folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from tqdm import tqdm

from cpm_live.data.distributed_dataset import _DEFAULT_BLOCK_SIZE, build_dataset
from cpm_live.data.jsonl import JsonlDataset
from cpm_live.data.serializer import JsonSerializer, PickleSerializer, Serializer
from cpm_live.data.shuffle import shuffle_dataset
from cpm_live.errors import CPMLiveError, DataFormatError, for_cli

RECORD_FORMATS = ("json", "original")


def record_serializer(fmt: str) -> Serializer:
    """``json`` (this package's default) or ``original`` (pickles, what CPM-Bee's ``DistributedDataset`` reads)."""
    if fmt not in RECORD_FORMATS:
        raise DataFormatError(f"`format` must be one of {', '.join(RECORD_FORMATS)}, got {fmt!r}")
    return PickleSerializer() if fmt == "original" else JsonSerializer()


def convert_file(jsonl_path: str, output_dir: str, output_name: str, seed: int, block_size: int,
                 fmt: str = "json") -> int:
    """Write one jsonl file as a shuffled binary dataset in `output_dir`; returns the record count.

    A bad record raises :class:`DataFormatError` naming `jsonl_path:line`.
    """
    os.makedirs(output_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".preprocess-", dir=output_dir)
    try:
        source = JsonlDataset(jsonl_path)
        with build_dataset(tmp_dir, "data", block_size=block_size, serializer=record_serializer(fmt)) as writer:
            with tqdm(total=len(source), desc=os.path.basename(jsonl_path), unit="rec") as bar:
                while True:
                    try:
                        record = source.read()
                    except EOFError:
                        break
                    try:
                        writer.write(record)
                    except ValueError as e:  # a record larger than a block
                        raise DataFormatError(f"{source.location}: {e}") from None
                    bar.update(1)
            source.close()
            count = writer.nlines
        shuffle_dataset(
            tmp_dir, output_dir, block_size=block_size, progress_bar=True, output_name=output_name, seed=seed
        )
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return count


def convert_folder(input_dir: str, output_path: str, output_name: str, seed: int, block_size: int,
                   fmt: str = "json") -> list[tuple[str, str, int]]:
    """Convert every file of `input_dir` to `output_path/<stem>/`; returns `(file name, output dir, records)`.

    All datasets are built in a temp folder inside `output_path` and renamed into place only when every
    file has converted, so a bad record leaves no output folder (complete-looking or not) behind.
    An existing output folder is refused before any work (nothing is overwritten or added to).
    """
    names = sorted(n for n in os.listdir(input_dir) if os.path.isfile(os.path.join(input_dir, n)))
    if not names:
        raise DataFormatError(f"--input {input_dir} contains no files")
    stems = [os.path.splitext(name)[0] for name in names]
    for i, stem in enumerate(stems):
        if stem in stems[:i]:
            raise DataFormatError(f"--input {input_dir} holds {names[stems.index(stem)]} and {names[i]}, which would "
                                  f"both become the dataset {stem}: rename or move one of them")
    if os.path.lexists(output_path) and not os.path.isdir(output_path):
        raise DataFormatError(f"--output_path {output_path} exists and is not a folder; choose another path")
    for stem in stems:
        out_dir = os.path.join(output_path, stem)
        if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
            raise DataFormatError(f"{out_dir} already exists; preprocess_dataset.py does not overwrite or add to "
                                  f"a dataset: remove it or choose another --output_path")
    os.makedirs(output_path, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".preprocess-", dir=output_path)
    try:
        counts = [convert_file(os.path.join(input_dir, name), os.path.join(staging, stem), output_name, seed,
                               block_size, fmt) for name, stem in zip(names, stems)]
        done = []
        for name, stem, count in zip(names, stems, counts):
            out_dir = os.path.join(output_path, stem)
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty (checked above)
            os.replace(os.path.join(staging, stem), out_dir)
            done.append((name, out_dir, count))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="folder of .jsonl files, one sample per line")
    parser.add_argument(
        "--output_path",
        "--output-path",
        dest="output_path",
        required=True,
        help="folder that receives one dataset folder per input file",
    )
    parser.add_argument(
        "--output_name",
        "--output-name",
        dest="output_name",
        required=True,
        help="data file name inside each dataset folder",
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (same seed, same order)")
    parser.add_argument(
        "--block_size",
        "--block-size",
        dest="block_size",
        type=int,
        default=_DEFAULT_BLOCK_SIZE,
        help="bytes per block (default 16 MiB)",
    )
    parser.add_argument("--format", dest="format", choices=RECORD_FORMATS, default="json",
                        help="record payloads: json (default; read by this package) or original (pickles, "
                             "readable by CPM-Bee's own DistributedDataset as well as by this package)")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input} is not a folder")
    try:
        done = convert_folder(args.input, args.output_path, args.output_name, args.seed, args.block_size,
                              args.format)
    except CPMLiveError as e:
        raise SystemExit(f"error: {for_cli(e, parser)}") from None
    for name, out_dir, count in done:
        print(f"{name}: {count} records -> {os.path.join(out_dir, args.output_name)}")
    return 0
