"""Convert a folder of `.jsonl` files into shuffled CPM-Bee binary datasets (JSON records).

For each file `X.ext` in `--input` this writes the dataset `OUTPUT_PATH/X/` with data file
`OUTPUT_NAME` (plus `meta.bin`), like the original `src/preprocess_dataset.py`, which stored pickles.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from tqdm import tqdm

from .distributed_dataset import _DEFAULT_BLOCK_SIZE, build_dataset
from .jsonl import JsonlDataset
from .utils import shuffle_dataset


def convert_file(jsonl_path: str, output_dir: str, output_name: str, seed: int, block_size: int) -> int:
    """Write one jsonl file as a shuffled binary dataset in `output_dir`; returns the record count."""
    os.makedirs(output_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".preprocess-", dir=output_dir)
    try:
        source = JsonlDataset(jsonl_path)
        with build_dataset(tmp_dir, "data", block_size=block_size) as writer:
            with tqdm(total=len(source), desc=os.path.basename(jsonl_path), unit="rec") as bar:
                while True:
                    try:
                        writer.write(source.read())
                    except EOFError:
                        break
                    bar.update(1)
            source.close()
            count = writer.nlines
        shuffle_dataset(
            tmp_dir, output_dir, block_size=block_size, progress_bar=True, output_name=output_name, seed=seed
        )
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return count


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
    args = parser.parse_args(argv)

    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input} is not a folder")
    names = sorted(n for n in os.listdir(args.input) if os.path.isfile(os.path.join(args.input, n)))
    if not names:
        parser.error(f"--input {args.input} contains no files")
    for name in names:
        stem = os.path.splitext(name)[0]
        out_dir = os.path.join(args.output_path, stem)
        count = convert_file(
            os.path.join(args.input, name), out_dir, args.output_name, args.seed, args.block_size
        )
        print(f"{name}: {count} records -> {os.path.join(out_dir, args.output_name)}")
    return 0
