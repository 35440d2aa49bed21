"""Convert a folder of CPM-Bee `.jsonl` files into binary datasets.

    python src/preprocess_dataset.py --input bee_data --output_path bin_data --output_name ccpm_data

writes `bin_data/train/ccpm_data` + `bin_data/train/meta.bin` for `bee_data/train.jsonl`, etc.
"""

import sys

from cpm_live.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
