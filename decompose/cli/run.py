"""``decompose MODEL --rank T``: the main job, and ``decompose report``: the same, dry run."""

from __future__ import annotations

import click

from ..api import decompose_file
from ..config import CalibrationConfig
from ..io.write import protect_inputs
from ..progress import quiet_progress
from ._common import (
    RANK_KEYS,
    config_from_options,
    emit,
    log,
    model_options,
    pop_keys,
    rank_options,
)
from ._measure import (
    CALIB_KEYS,
    DATA_KEYS,
    LATENCY_KEYS,
    calibration_batches_from,
    calibration_options,
    data_options,
    latency_options,
    make_loader_from,
)


def _nothing_to_do(report, model_path: str) -> None:
    reasons = sorted({lp.skipped for lp in report.layers if lp.skipped})
    why = "; ".join(reasons[:3]) if reasons else "it has no Conv1d/2d/3d or ConvTranspose1d/2d/3d layer"
    raise click.ClickException(f"no layer of {model_path} can be decoupled ({why}); nothing "
                               "written. Check --include/--exclude, or use a model with k x k convs")


@click.command("run")
@click.argument("model", type=click.Path(dir_okay=True))
@rank_options
@model_options
@data_options()
@latency_options
@calibration_options
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write PNG figures to DIR: singular-value energy and kernel error vs rank "
                   "per layer (needs matplotlib).")
@click.option("-o", "--output", type=click.Path(), help="Where to write the decomposed model. "
              "Default: MODEL.decomposed.pt next to MODEL.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (and --plot "
              "figures); never an input, a folder, a device or a FIFO.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr.")
def run_cmd(model: str, **opts) -> None:
    """Decouple every k x k convolution of MODEL into depthwise + pointwise pieces.

    Writes MODEL.decomposed.pt (never overwriting without --force) and prints a per-layer report.
    The original and the decomposed model are timed side by side (--no-latency to skip); with
    --data the report adds top-1/top-5 before and after on the same images, the SQNR of the
    outputs and each layer's own output error (docs/report.md explains every number).

    \b
    Examples:
      decompose model.pt --rank 1
      decompose resnet20.th --arch decompose.models.cifar_resnet:resnet20 --energy 0.9 --json
      decompose resnet20.th --arch decompose.models.cifar_resnet:resnet20 --rank 2 \\
          --exclude conv1 --data cifar10/test --limit 2000 --plot figures/
      decompose model.pt --target-macs 0.4 --exclude conv1 -o small.pt --no-latency
      decompose resnet56.th --arch decompose.models.cifar_resnet:resnet56 --rank 3 \\
          --exclude conv1 --calibrate cifar10/train --calib-samples 512 --data cifar10/test
    """
    config = config_from_options(**pop_keys(opts, RANK_KEYS))
    data_opts, lat = pop_keys(opts, DATA_KEYS), pop_keys(opts, LATENCY_KEYS)
    quiet = opts["quiet"]
    calib_opts = pop_keys(opts, CALIB_KEYS)
    with quiet_progress(quiet), protect_inputs(model, data_opts["data"], calib_opts["calib_dir"]):
        if opts["plot_dir"]:
            from ..measure.plots import REPORT_FIGURES, check_plot_targets, require_matplotlib
            require_matplotlib()  # fail before any work
            check_plot_targets(opts["plot_dir"], REPORT_FIGURES, opts["force"])
        loader = make_loader_from(data_opts)
        batches = data_shape = None
        if loader is not None:
            from ..measure.compare import cache_batches
            batches = cache_batches(loader)
            data_shape = tuple(batches[0][0].shape[1:]) if batches else None
        kept = {}
        calib = calibration_batches_from(calib_opts, data_opts)

        def before_save(report, original, decomposed):
            if batches is not None or lat["latency"]:
                from ..measure.compare import measure
                measure(report, original, decomposed, batches=batches, latency=lat["latency"],
                        latency_batch=lat["latency_batch"], repeats=lat["repeats"],
                        threads=lat["threads"])
            kept["original"] = original

        needed = batches is not None or lat["latency"] or opts["plot_dir"]
        report, _, out = decompose_file(
            model, config, arch=opts["arch"], allow=opts["allow"], trust=opts["trust"],
            allow_functions=opts["allow_functions"], output=opts["output"],
            force=opts["force"], data_shape=data_shape,
            before_save=before_save if needed else None, calibration=calib,
            calibration_config=CalibrationConfig(samples=calib_opts["calib_samples"],
                                                 method=calib_opts["calib_method"]),
            log=lambda msg: log(msg, quiet))
        if out is None:
            _nothing_to_do(report, model)
        if opts["plot_dir"]:
            from ..measure.plots import plot_report
            for path in plot_report(report, kept["original"], opts["plot_dir"],
                                    force=opts["force"]):
                log(f"wrote {path}", quiet)
    emit(report, opts["as_json"])
    log(f"wrote {out}", quiet)


@click.command("report")
@click.argument("model", type=click.Path(dir_okay=True))
@rank_options
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def report_cmd(model: str, **opts) -> None:
    """Show what decomposing MODEL would do, per layer, without writing anything.

    On a file written by decompose it lists the layers already decoupled and what is left.

    \b
    Examples:
      decompose report model.pt --rank 2
      decompose report resnet56.th --arch decompose.models.cifar_resnet:resnet56 --energy 0.8 --json
    """
    config = config_from_options(**pop_keys(opts, RANK_KEYS))
    report, loaded, _ = decompose_file(model, config, arch=opts["arch"], allow=opts["allow"],
                                       trust=opts["trust"], write=False,
                                       allow_functions=opts["allow_functions"])
    if loaded.kind == "decomposed":
        report.already_decomposed = loaded.meta.get("layers", [])
        log(f"{model} was written by decompose: {len(loaded.meta.get('layers') or [])} layers "
            f"decomposed from {loaded.meta.get('source')} (checksum {loaded.checksum})")
    emit(report, opts["as_json"])
