"""Fill in the "<ans>" of CPM-Bee jsonl records (beam search, sampling or greedy).

    python src/text_generation.py --model-config src/config/cpm-bee-10b.json --load cpm-bee-10b.pt \
        --input in.jsonl --output out.jsonl --beam-size 3 --max-length 100 --repetition-penalty 1.1
    python src/text_generation.py --load cpm-bee-10b/ --input in.jsonl --output out.jsonl   # HF model directory

See `cpm_live.generation.cli` for every option (--delta, --sampling, --greedy, --batch-size, --device).
"""

import sys

from cpm_live.generation.cli import main

if __name__ == "__main__":
    sys.exit(main())
