"""cpm-bee-plot on the metrics of a real training run."""

from cpm_live.training.cli import main as finetune
from cpm_live.training.plot import main as plot
from tests.unit.training.test_plot import png_size


def test_plot_of_a_training_run(tiny, tmp_path):
    """The metrics of a real (short) QLoRA run with evaluation become a PNG."""
    from tests.conftest import DATA, base_args

    run = tmp_path / "run"
    finetune(base_args(tiny, run, 6, "--model-config", str(tiny / "config-int4.json"), "--load",
                       str(tiny / "base-int4.safetensors"), "--use-delta", "--eval_dataset",
                       str(DATA / "eval.jsonl"), "--eval-interval", "3", "--eval-metrics", "accuracy"))
    assert plot([str(run / "metrics.jsonl"), "-o", str(tmp_path / "loss.png")]) == 0
    width, height = png_size(tmp_path / "loss.png")
    assert width > 300 and height > 200
    assert plot([str(run), "-o", str(tmp_path / "dir.png")]) == 0  # the run directory works too
    assert (tmp_path / "dir.png").stat().st_size > 1000
