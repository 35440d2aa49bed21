"""Train a small format-trained stand-in for a pretrained CPM-Bee (any vocab, CPU, about a minute).

    python src/build_format_base.py --data bee_data/train.jsonl --vocab bee.txt --out format_base

Generic pick / write / copy tasks are built from the texts of the CPM-Bee records in --data (their
"<ans>" values are never read) and a 2-layer model is fully fine-tuned on them from random weights:
format_base/base.pt (fp32, original key layout) and format_base/config.json. Options: --model-config,
--steps, --records, --lr, --batch-size, --max-length, --max-chars, --seed.
Same as the ``cpm-bee-format-base`` console script (:mod:`cpm_live.demo.format_base`).
"""

from cpm_live.demo.format_base import main

if __name__ == "__main__":
    main()
