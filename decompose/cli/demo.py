"""``decompose demo``: the main job end to end on a model that needs no download."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from ._common import emit, log


@click.command("demo")
@click.option("--rank", default=1, show_default=True, type=click.IntRange(min=1),
              help="Depthwise-separable terms kept per layer.")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Keep the trained and decomposed models here (default: a temporary folder).")
@click.option("--force", is_flag=True, help="Overwrite files in --workdir.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No logs on stderr.")
def demo_cmd(rank: int, workdir: str | None, force: bool, as_json: bool, quiet: bool) -> None:
    """Train a small CNN on scikit-learn's bundled 8x8 digits (seconds, no download), save it,
    decompose it with the same code path as 'decompose MODEL', and report accuracy before/after.

    \b
    Examples:
      decompose demo
      decompose demo --rank 2 --workdir demo-out --json
    """
    from torch.utils.data import DataLoader, TensorDataset

    from ..api import decompose_file
    from ..io.files import load, serialize
    from ..io.write import write_bytes
    from ..measure.evaluate import evaluate
    from ..models.digits import load_digits_tensors, train_digits_cnn

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="decompose-demo-")
        workdir = tmp.name
    try:
        folder = Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
        log("training a small CNN on scikit-learn's 8x8 digits ...", quiet)
        model = train_digits_cnn(seed=0)
        src = folder / "digits-cnn.pt"
        write_bytes(src, serialize(model), force)
        log(f"saved {src}", quiet)
        from ..config import DecomposeConfig
        report, _, out = decompose_file(str(src), DecomposeConfig(rank=rank), force=force,
                                        log=lambda msg: log(msg, quiet))
        _, _, x_test, y_test = load_digits_tensors(seed=0)
        loader = DataLoader(TensorDataset(x_test, y_test), batch_size=256)
        before = evaluate(model, loader, progress=False)
        after = evaluate(load(out), loader, progress=False)
        report.accuracy = {
            "before": {"top1": before.top1, "top5": before.top5},
            "after": {"top1": after.top1, "top5": after.top5},
            "drop_top1": 100 * (before.top1 - after.top1),
            "images": before.n,
        }
        if tmp is not None:
            report.output = f"{out} (temporary; pass --workdir to keep it)"
        emit(report, as_json)
    finally:
        if tmp is not None:
            tmp.cleanup()
