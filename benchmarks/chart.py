"""One PNG summarising a results JSON (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads

from cpm_live.utils import atomic_path  # noqa: E402

COLORS = {"full": "#999999", "lora_fp32": "#4c72b0", "lora_bf16": "#8172b2", "qlora": "#dd8452",
          "int8": "#c44e52", "qlora_int8": "#c44e52",
          "cpm_live / hf_bnb": "#dd8452", "hf_bnb / dense": "#55a868", "cpm_live / dense": "#4c72b0"}


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name, color=COLORS.get(name))
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if series:
        ax.legend(fontsize=7)


def _finetune(ax_time, ax_mem, finetune: dict[str, Any]) -> None:
    configs = finetune["configs"]
    groups = [f"d{c['dim']} L{c['layers']}\n{c['tokens']} tok" for c in configs]
    ratios = {name: [c["ratios"].get(f"{name}_over_lora_time", 0.0) for c in configs]
              for name in ("full", "qlora", "int8") if any(f"{name}_over_lora_time" in c["ratios"] for c in configs)}
    _grouped_bars(ax_time, groups, ratios, f"step time / {finetune['baseline_for_qlora']} step time",
                  "step time (fwd+bwd+AdamW) vs LoRA, paired median")
    ax_time.axhline(1.0, color="black", lw=0.8)
    modes = finetune["modes"]
    _grouped_bars(ax_mem, groups, {m: [c["modes"][m]["peak_above_baseline_mib"] for c in configs] for m in modes},
                  "MiB above warm-up baseline", "peak memory of a step")


def _layers(ax, layers: dict[str, Any]) -> None:
    rows = layers["results"]
    groups = [f"{r['dim_in']}x{r['dim_out']}\n{r['tokens']} tok" for r in rows]
    series = {"cpm_live / hf_bnb": "cpm_live_over_hf_bnb", "hf_bnb / dense": "hf_bnb_over_dense",
              "cpm_live / dense": "cpm_live_over_dense"}
    _grouped_bars(ax, groups, {label: [r[key] for r in rows] for label, key in series.items()},
                  "time ratio", "one projection + LoRA, fwd+bwd, paired median")
    ax.axhline(1.0, color="black", lw=0.8)


def _quantize(ax, streaming: dict[str, Any]) -> None:
    for fmt, data in streaming["formats"].items():
        xs = [r["input_bytes"] / 2**20 for r in data["runs"]]
        ys = [r["peak_above_baseline_bytes"] / 2**20 for r in data["runs"]]
        ax.plot(xs, ys, marker="o", label=f"{fmt} (slope {data['peak_slope_mib_per_input_mib']:.3f})")
    ax.set_xlabel("input checkpoint MiB")
    ax.set_ylabel("peak RSS above baseline, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("quantize_state_dict peak memory", fontsize=9)
    ax.legend(fontsize=7)


def _estimate(ax, est: dict[str, Any], measured: dict[str, Any] | None) -> None:
    modes = ("qlora", "lora_bf16")
    stacks = [{**est[m]["parts_gib"],
               "working set": max(est[m]["one_block_recompute_gib"], est[m]["loss_backward_gib"])} for m in modes]
    bottoms = [0.0] * len(modes)
    for part in stacks[0]:
        values = [stack[part] for stack in stacks]
        ax.bar(range(len(modes)), values, 0.6, bottom=bottoms, label=part)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    if measured:
        for i, mode in enumerate(modes):
            if "peak_gib" in measured.get(mode, {}):
                ax.plot([i - 0.3, i + 0.3], [measured[mode]["peak_gib"]] * 2, "k-", lw=2)
    ax.axhline(est["target_gib"], color="red", ls="--", lw=1, label=f"{est['target_gib']:.0f} GiB target")
    ax.set_xticks(range(2), ["QLoRA (nf4)", "LoRA (bf16)"])
    ax.set_ylabel("GiB")
    ax.set_title("CPM-Bee-10B step at 2048 tokens, est. peak", fontsize=9)
    ax.legend(fontsize=6)


def write_chart(results: dict[str, Any], path: str) -> None:
    """Draw every section present in ``results`` and write the PNG atomically."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    axes = axes.flatten()
    if "finetune" in results:
        _finetune(axes[0], axes[1], results["finetune"])
    if "layers" in results:
        _layers(axes[2], results["layers"])
    if "quantize_streaming" in results:
        _quantize(axes[3], results["quantize_streaming"])
    if "profile" in results:
        prof = results["profile"]
        modes = ["qlora", prof["baseline"]]
        categories = sorted({c for m in modes for c in prof[m]["categories_ms"]})
        _grouped_bars(axes[4], categories, {m: [prof[m]["categories_ms"].get(c, 0.0) for c in categories]
                                            for m in modes},
                      "ms per step (self time)", f"profile d{prof['dim']} {prof['tokens']} tok: where time goes")
        axes[4].tick_params(axis="x", labelrotation=30)
    if "estimate_10b" in results:
        _estimate(axes[5], results["estimate_10b"], results.get("measured_10b"))
    meta = results.get("meta", {})
    env = meta.get("env", {})
    plan = "tiny" if meta.get("tiny") else "quick" if meta.get("quick") else "full"
    fig.suptitle(f"cpm_live benchmarks ({plan}, {env.get('device', '?')}, "
                 f"torch {env.get('torch', '?')}, bitsandbytes {env.get('bitsandbytes', '?')}, "
                 f"{env.get('torch_threads', '?')} thread(s) of {env.get('cpu_count', '?')} cores)", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
