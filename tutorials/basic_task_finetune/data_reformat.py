"""Turn the CCPM raw data into CPM-Bee JSON samples (a four-option multiple-choice task).

Run it inside this folder, where `raw_data/` holds the CCPM files::

    python data_reformat.py                                    # raw_data/*.jsonl -> bee_data/*.jsonl
    python data_reformat.py --input raw_data --output bee_data

A raw line ``{"target": "3", "input": "[翻译]<text>[0]<a>[1]<b>[2]<c>[3]<d>[答案]"}`` becomes::

    {"input": "<text>", "options": {"<option_0>": "<a>", ..., "<option_3>": "<d>"},
     "question": "这段话形容了哪句诗的意境？", "<ans>": "<option_3>"}

Lines in the CCPM test layout (``{"translation", "choices", "answer"}``) are accepted too. The output
is byte-identical to the original CPM-Bee tutorial's ``bee_data``. A malformed line stops the run with
its file and line number; nothing is written for that file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from cpm_live.utils import atomic_path

QUESTION = "这段话形容了哪句诗的意境？"
NUM_OPTIONS = 4
# The whole raw `input` field: the modern-Chinese translation, then the four candidate lines.
RAW_INPUT = re.compile(r"\[翻译\](.*?)\[0\](.*?)\[1\](.*?)\[2\](.*?)\[3\](.*?)\[答案\]", re.DOTALL)


class CCPMFormatError(ValueError):
    """A raw line cannot be converted. Its own class (not cpm_live's DataFormatError) keeps torch out of this script."""


def _answer(target: Any) -> str:
    """`"3"` or `3` -> `"<option_3>"`; anything else is an error (it would make an unlearnable label)."""
    text = str(target) if isinstance(target, (str, int)) and not isinstance(target, bool) else None
    if text is None or text not in {str(k) for k in range(NUM_OPTIONS)}:
        raise CCPMFormatError(f"answer must be one of 0..{NUM_OPTIONS - 1}, got {target!r}")
    return f"<option_{text}>"


def reformat_record(raw: dict[str, Any]) -> dict[str, Any]:
    """One raw CCPM record (train/eval layout, or the test layout) as a CPM-Bee sample."""
    if not isinstance(raw, dict):
        raise CCPMFormatError(f"expected a JSON object, got {type(raw).__name__}")
    if "translation" in raw:
        missing = [k for k in ("translation", "choices", "answer") if k not in raw]
        if missing:
            raise CCPMFormatError(f"test-layout record lacks {missing}")
        text, choices, target = raw["translation"], raw["choices"], raw["answer"]
        if not (isinstance(choices, list) and len(choices) == NUM_OPTIONS
                and all(isinstance(c, str) for c in choices)):
            raise CCPMFormatError(f"'choices' must be a list of {NUM_OPTIONS} strings, got {choices!r}")
    else:
        missing = [k for k in ("input", "target") if k not in raw]
        if missing:
            raise CCPMFormatError(f"record lacks {missing} (expected {{\"target\", \"input\"}})")
        if not isinstance(raw["input"], str):
            raise CCPMFormatError(f"'input' must be a string, got {type(raw['input']).__name__}")
        match = RAW_INPUT.fullmatch(raw["input"])
        if match is None:
            raise CCPMFormatError(
                f"'input' is not '[翻译]<text>[0]<a>[1]<b>[2]<c>[3]<d>[答案]': {raw['input'][:80]!r}"
            )
        text, *choices = match.groups()
        target = raw["target"]
    if not isinstance(text, str):
        raise CCPMFormatError(f"the passage must be a string, got {type(text).__name__}")
    return {
        "input": text,
        "options": {f"<option_{k}>": choice for k, choice in enumerate(choices)},
        "question": QUESTION,
        "<ans>": _answer(target),
    }


def reformat_file(source: str | os.PathLike, target: str | os.PathLike) -> int:
    """Convert one raw `.jsonl` file; returns the number of records. Blank lines are skipped."""
    source = os.fspath(source)
    lines = []
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                lines.append(json.dumps(reformat_record(json.loads(line)), ensure_ascii=False) + "\n")
            except json.JSONDecodeError as e:
                raise CCPMFormatError(f"{source}:{lineno}: not valid JSON ({e.msg})") from e
            except CCPMFormatError as e:
                raise CCPMFormatError(f"{source}:{lineno}: {e}") from e
    # Written only once every line converted, so a bad line leaves no half-written file behind.
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
    return len(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="raw_data", help="folder of raw CCPM .jsonl files (default raw_data)")
    parser.add_argument("--output", default="bee_data", help="folder for the CPM-Bee .jsonl files (default bee_data)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input} is not a folder; download the CCPM raw_data/ from the CPM-Bee "
                     "repository (tutorials/basic_task_finetune/raw_data) or pass --input")
    names = sorted(n for n in os.listdir(args.input) if n.endswith(".jsonl"))
    if not names:
        parser.error(f"--input {args.input} has no .jsonl files")
    for name in names:
        try:
            count = reformat_file(os.path.join(args.input, name), os.path.join(args.output, name))
        except CCPMFormatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{os.path.join(args.input, name)}: {count} records -> {os.path.join(args.output, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
