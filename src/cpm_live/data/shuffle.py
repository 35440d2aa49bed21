"""Dataset maintenance: shuffling a binary dataset into a new one."""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile

from tqdm import tqdm

from cpm_live.data.distributed_dataset import _DEFAULT_BLOCK_SIZE, SimpleDataset, build_dataset
from cpm_live.data.serializer import RawSerializer

_DEFAULT_SHUFFLE_BUCKET_SIZE = 1 << 30
_LENGTH = struct.Struct("<I")


def shuffle_dataset(
    path_src: str,
    path_tgt: str,
    block_size: int = _DEFAULT_BLOCK_SIZE,
    bucket_size: int = _DEFAULT_SHUFFLE_BUCKET_SIZE,
    progress_bar: bool = False,
    output_name: str | None = None,
    seed: int | None = None,
) -> str:
    """Write the records of `path_src` in random order as file `output_name` of dataset `path_tgt`.

    Two passes so memory stays near `bucket_size`: every record goes to a random bucket file, then
    each bucket is shuffled in memory and appended. Payloads are copied as raw bytes (JSON stays JSON,
    legacy pickles stay pickles). Returns the output file name.
    """
    rng = random.Random(seed)
    src = SimpleDataset(path_src, serializer=RawSerializer(), shuffle=True, seed=rng.randrange(1 << 31))
    num_buckets = (src.nbytes + bucket_size - 1) // bucket_size
    if output_name is None:
        output_name = f"{rng.randrange(1 << 32):08x}.shuffle"
    os.makedirs(path_tgt, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".shuffle-", dir=path_tgt)
    try:
        buckets = [open(os.path.join(tmp_dir, f"bucket{i}"), "wb") for i in range(num_buckets)]
        try:
            for data in tqdm(src, desc="Shuffle step 1/2", total=len(src), disable=not progress_bar):
                buckets[int(rng.random() * num_buckets)].write(_LENGTH.pack(len(data)) + data)
        finally:
            for fp in buckets:
                fp.close()
            src.close()
        with build_dataset(
            path_tgt, output_name, block_size=block_size, serializer=RawSerializer()
        ) as writer:
            for i in tqdm(range(num_buckets), desc="Shuffle step 2/2", disable=not progress_bar):
                records = []
                with open(os.path.join(tmp_dir, f"bucket{i}"), "rb") as fp:
                    while header := fp.read(_LENGTH.size):
                        records.append(fp.read(_LENGTH.unpack(header)[0]))
                rng.shuffle(records)
                for data in records:
                    writer.write(data)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return output_name
