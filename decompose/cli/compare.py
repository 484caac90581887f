"""``decompose compare MODEL --methods nd,cp,auto --targets 0.5,0.25``: methods side by side."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import CalibrationConfig
from ..io.write import protect_inputs
from ..progress import quiet_progress
from ._common import (
    BUILD_KEYS,
    build_fields,
    build_options,
    emit,
    log,
    model_options,
    parse_shape,
    pop_keys,
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
    parse_list,
)
from .sweep import check_table_outputs, load_with_data


@click.command("compare")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--methods", default="auto", show_default=True, metavar="M,M,...",
              help="Methods to compare (registered names or auto), comma-separated; "
                   "'nd+cp' restricts one row's auto to those methods.")
@click.option("--targets", default="0.5,0.25", show_default=True, metavar="F,F,...",
              help="MACs budgets: fractions of the factorizable layers' multiply-adds.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only convs whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave convs whose name matches alone (repeatable), e.g. conv1.")
@click.option("--input-shape", metavar="C,H,W",
              help="One input sample's shape. Default: model.input_shape, else the data's.")
@build_options
@model_options
@data_options()
@latency_options
@calibration_options
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the rows to FILE as CSV.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write DIR/compare_macs.png and DIR/compare_latency.png: top-1 against MACs "
                   "and against measured latency, per method (matplotlib).")
@click.option("--force", is_flag=True, help="Replace an existing --csv file or figure.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr.")
def compare_cmd(model: str, **opts) -> None:
    """Factor MODEL with every method at every MACs budget and measure each side by side.

    One row per (method, budget): MACs and params ratio, mean kernel error, top-1 on --data
    before and after calibrating on --calibrate images (no labels), the measured speed-up of
    the whole model, and the seconds spent factoring and calibrating. Nothing is written but
    --csv and --plot. Kernel errors are not comparable across methods: read the accuracy.

    \b
    Examples:
      decompose compare model.pt --methods nd,cp,tucker2,auto --targets 0.5,0.25
      decompose compare resnet56.th --arch decompose.models.cifar_resnet:resnet56 \\
          --methods nd,cp,cp4,tucker2,spatial-svd,channel-svd,auto --targets 0.5,0.25 \\
          --exclude conv1 --calibrate cifar10/train --data cifar10/test --limit 2000 \\
          --csv compare.csv --plot figures/
    """
    from ..compare import compare, compare_configs
    data_opts, lat = pop_keys(opts, DATA_KEYS), pop_keys(opts, LATENCY_KEYS)
    calib_opts = pop_keys(opts, CALIB_KEYS)
    quiet = opts["quiet"]
    methods = [m.strip().replace("+", ",") for m in opts["methods"].split(",") if m.strip()]
    targets = parse_list(opts["targets"], "--targets", float, "0.5,0.25")
    shape = parse_shape(opts["input_shape"])
    build = build_fields(**pop_keys(opts, BUILD_KEYS))
    build.pop("method")
    common = dict(include=tuple(opts["include"]), exclude=tuple(opts["exclude"]), **build)
    compare_configs(methods, targets, input_shape=shape, **common)  # validate before loading
    from ..measure.plots import COMPARE_FIGURES
    inputs = (model, data_opts["data"], calib_opts["calib_dir"])
    check_table_outputs(opts, inputs, list(COMPARE_FIGURES))
    with quiet_progress(quiet), protect_inputs(*inputs):
        calib = calibration_batches_from(calib_opts, data_opts)
        loader = make_loader_from(data_opts)
        loaded, batches, shape = load_with_data(model, opts, loader, shape, quiet)
        log(f"{len(methods)} methods x {len(targets)} budgets" +
            (f", each calibrated on {calib_opts['calib_samples']} images" if calib else ""),
            quiet)
        result = compare(loaded.model, methods, targets, batches=batches, meta=loaded.meta,
                         calibration=calib, latency=lat["latency"],
                         latency_batch=lat["latency_batch"], repeats=lat["repeats"],
                         threads=lat["threads"], fields={**common, "input_shape": shape},
                         calibration_config=CalibrationConfig(
                             samples=calib_opts["calib_samples"],
                             method=calib_opts["calib_method"]))
        if opts["csv_path"]:
            log(f"wrote {result.to_csv(opts['csv_path'], force=opts['force'])}", quiet)
        if opts["plot_dir"]:
            from ..measure.plots import plot_compare
            before = next((r["before_ms"] for r in result.rows if r.get("before_ms")), None)
            for path in plot_compare(result.rows, opts["plot_dir"],
                                     {**result.baseline, "before_ms": before},
                                     title=f"{Path(model).name}: methods at equal MACs",
                                     force=opts["force"]):
                log(f"wrote {path}", quiet)
    emit(result, opts["as_json"])
