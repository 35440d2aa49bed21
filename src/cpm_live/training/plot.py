"""``cpm-bee-plot``: the loss curve of a run from its ``metrics.jsonl``, as a PNG (or SVG/PDF).

    cpm-bee-plot RUN_DIR/metrics.jsonl -o loss.png      # or just RUN_DIR
    cpm-bee-plot run_a/metrics.jsonl run_b/metrics.jsonl -o compare.png

Plots the train loss of every logged step and the eval loss of every evaluation against the step.
When the run logged generation scores on the eval set (``--eval-metrics accuracy``), the accuracy is
drawn on a second axis on the right. The figure is built without pyplot (no display, no global
state) and written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from cpm_live.data.jsonl import read_line
from cpm_live.errors import CPMLiveError, PlotError, for_cli
from cpm_live.outputs import check_output_file
from cpm_live.utils import atomic_path


def _read(path: str) -> list[dict[str, Any]]:
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path} does not exist; pass a run's metrics.jsonl (written under --save) or its directory")
    records = []
    with open(path, "rb") as f:
        number = 0
        while line := read_line(f, f"{path}:{number + 1}"):
            number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise PlotError(f"{path}:{number}: not JSON ({reason}); is this a metrics.jsonl?") from None
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    if not any("loss" in r or "eval_loss" in r for r in records):
        raise PlotError(f"{path} has no loss records; is this a metrics.jsonl from cpm-bee-finetune?")
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(paths: Sequence[str], output: str, title: str | None = None) -> str:
    """Draw train/eval loss (and eval accuracy, if logged) of each run in ``paths`` into ``output``."""
    from matplotlib.figure import Figure

    runs = [(path, _read(path)) for path in paths]
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    acc_ax = None
    for i, (path, records) in enumerate(runs):
        name = f" ({os.path.dirname(path) or path})" if len(runs) > 1 else ""
        color = f"C{2 * i}"
        ax.plot(*_series(records, "loss"), color=color, linewidth=1, alpha=0.8, label=f"train loss{name}")
        steps, values = _series(records, "eval_loss")
        if steps:
            ax.plot(steps, values, "o-", color=f"C{2 * i + 1}", label=f"eval loss{name}")
        steps, values = _series(records, "accuracy")
        if steps:
            acc_ax = acc_ax or ax.twinx()
            acc_ax.plot(steps, values, "s--", color=f"C{2 * i + 2}", label=f"eval accuracy{name}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy per answer token)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if acc_ax is not None:
        acc_ax.set_ylabel("eval accuracy (exact match)")
        acc_ax.set_ylim(0, 1.05)
        more = acc_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="center right")
    ax.set_title(title or (runs[0][0] if len(runs) == 1 else "loss"))
    fig.tight_layout()
    fmt = os.path.splitext(output)[1].lstrip(".").lower() or "png"
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format=fmt)
    return output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Plot train and eval loss against the step from metrics.jsonl files.")
    p.add_argument("metrics", nargs="+", help="a run's metrics.jsonl, or the run directory holding it")
    p.add_argument("-o", "--output", default="loss.png", help="image to write (.png, .svg or .pdf)")
    p.add_argument("--title", default=None, help="figure title (default: the metrics path)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.path.splitext(args.output)[1].lower() not in (".png", ".svg", ".pdf"):
        raise SystemExit(f"error: --output {args.output} must end in .png, .svg or .pdf")
    try:
        check_output_file(args.output, args.metrics, force=args.force)
        plot_metrics(args.metrics, args.output, args.title)
    except CPMLiveError as e:
        raise SystemExit(f"error: {for_cli(e, parser)}") from None
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    main()
