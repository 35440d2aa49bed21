"""Score generated "<ans>" values against references (accuracy, ROUGE-1/2/L, BLEU-4).

    python src/evaluate.py --pred out.jsonl --ref eval.jsonl --metrics accuracy,rouge,bleu \
        --output scores.json

See `cpm_live.evaluation` for how each metric is computed.
"""

import sys

from cpm_live.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
