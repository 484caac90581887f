"""``decompose sweep MODEL --ranks 1,2,3``: one row per setting, measured the same way."""

from __future__ import annotations

import click

from ..config import CalibrationConfig
from ..io.files import load_model
from ..io.write import check_target, protect_inputs
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

ORDERS = ("auto", "dw-pw", "pw-dw")


def _orders(text: str) -> list[str]:
    from ..errors import DecomposeError
    orders = [o.strip() for o in text.split(",")]
    bad = [o for o in orders if o not in ORDERS]
    if bad or not orders:
        raise DecomposeError(f"--orders takes a comma-separated list of {', '.join(ORDERS)}; "
                             f"got {text!r}")
    return orders


def check_table_outputs(opts: dict, inputs: tuple, figures: list[str]) -> None:
    """Fail before any work when --csv or --plot's figures may not be written (an existing file
    without --force, an input, a folder, a device...)."""
    with protect_inputs(*inputs):
        if opts["csv_path"]:
            check_target(opts["csv_path"], opts["force"], what="--csv file")
        if opts["plot_dir"]:
            from ..measure.plots import check_plot_targets, require_matplotlib
            require_matplotlib()
            check_plot_targets(opts["plot_dir"], figures, opts["force"])


def load_with_data(model: str, opts: dict, loader, shape, quiet: bool):
    """The model, its --data batches in memory, and the input shape (the data's when neither
    --input-shape nor the model says it): what sweep and compare measure with."""
    from ..engine.trace import infer_input_shape
    loaded = load_model(model, arch=opts["arch"], allow=opts["allow"], trust=opts["trust"],
                        allow_functions=opts["allow_functions"])
    log(f"loaded {model} ({loaded.kind}, {type(loaded.model).__name__})", quiet)
    batches = None
    if loader is not None:
        from ..measure.compare import cache_batches
        batches = cache_batches(loader)
        if shape is None and batches:
            _, source = infer_input_shape(loaded.model, None, loaded.meta)
            if source == "default":
                shape = tuple(batches[0][0].shape[1:])
    return loaded, batches, shape


@click.command("sweep")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--ranks", metavar="T,T,...", help="Ranks to try, e.g. 1,2,3,4,9.")
@click.option("--energies", metavar="E,E,...", help="Kept-energy fractions to try, e.g. 0.5,0.8.")
@click.option("--targets", metavar="F,F,...",
              help="Global MACs budgets (fraction of the decomposable layers' MACs), e.g. 0.3,0.5.")
@click.option("--latency-targets", metavar="F,F,...",
              help="Latency budgets: the whole model, timed here at --plan-batch, takes at most "
                   "fraction F (0<F<1) of the original's time, e.g. 0.5,0.7 (docs/speed.md).")
@click.option("--orders", default="auto", show_default=True, metavar="O,O,...",
              help="Orders to try each setting in: auto, dw-pw, pw-dw (comma-separated).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only convs whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave convs whose name matches alone (repeatable), e.g. conv1.")
@click.option("--input-shape", metavar="C,H,W",
              help="One input sample's shape. Default: the model's, else the data's.")
@build_options
@model_options
@data_options()
@latency_options
@calibration_options
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the rows to FILE as CSV.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write DIR/sweep.png: top-1 and measured speed-up against MACs (matplotlib).")
@click.option("--force", is_flag=True,
              help="Replace an existing --csv file or DIR/sweep.png (never an input, a folder, "
                   "a device or a FIFO).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr.")
def sweep_cmd(model: str, **opts) -> None:
    """Decompose MODEL at several settings and measure each: one row per setting.

    Settings: every value of --ranks, --energies, --targets and --latency-targets, each in
    every one of --orders; the other decoupling flags (--fold-bn, --form, --latency-aware,
    --plan-batch, --plan-threads, --channels-last, --include, --exclude) apply to all of them.
    With --calibrate every setting is also calibrated (as 'decompose MODEL --calibrate DIR';
    the images are read once) before it is measured.

    Each row: MACs and params ratio (whole model), mean kernel error, top-1 and its drop on
    --data (the original is evaluated once, on the same images), SQNR of the outputs, and the
    measured speed-up of the whole model; timed settings add the planner's predicted latency
    fraction, calibrated ones the calibration time. Nothing is written but --csv and --plot
    (existing files only replaced with --force).

    \b
    Examples:
      decompose sweep model.pt --ranks 1,2,3,4,9
      decompose sweep resnet20.th --arch decompose.models.cifar_resnet:resnet20 \\
          --ranks 1,2,3 --orders dw-pw,pw-dw --exclude conv1 --data cifar10/test --limit 2000
      decompose sweep model.pt --energies 0.5,0.8 --targets 0.3,0.5 --data imgs/ --csv s.csv
      decompose sweep model.pt --latency-targets 0.5,0.7 --form fastest --plan-batch 8
      decompose sweep resnet56.th --arch decompose.models.cifar_resnet:resnet56 \\
          --ranks 2,3 --exclude conv1 --fold-bn --form auto --calibrate cifar10/train \\
          --calib-samples 512 --data cifar10/test --limit 2000
    """
    from ..sweep import EXAMPLES, sweep, sweep_configs
    data_opts, lat = pop_keys(opts, DATA_KEYS), pop_keys(opts, LATENCY_KEYS)
    calib_opts = pop_keys(opts, CALIB_KEYS)
    quiet = opts["quiet"]
    ranks = parse_list(opts["ranks"], "--ranks", int, EXAMPLES["rank"])
    energies = parse_list(opts["energies"], "--energies", float, EXAMPLES["energy"])
    targets = parse_list(opts["targets"], "--targets", float, EXAMPLES["target_macs"])
    latency_targets = parse_list(opts["latency_targets"], "--latency-targets", float,
                                 EXAMPLES["target_latency"])
    orders = _orders(opts["orders"])
    shape = parse_shape(opts["input_shape"])
    common = dict(include=tuple(opts["include"]), exclude=tuple(opts["exclude"]),
                  latency_targets=latency_targets,
                  **build_fields(**pop_keys(opts, BUILD_KEYS)))
    if common["allocation"] == "output" and not calib_opts["calib_dir"]:
        raise click.BadParameter("output errors are measured on calibration images: add "
                                 "--calibrate DIR", param_hint="--allocate")
    sweep_configs(ranks, energies, targets, orders, input_shape=shape, **common)  # validate
    from ..measure.plots import SWEEP_FIGURE
    inputs = (model, data_opts["data"], calib_opts["calib_dir"])
    check_table_outputs(opts, inputs, [SWEEP_FIGURE])
    with quiet_progress(quiet), protect_inputs(*inputs):
        calib = calibration_batches_from(calib_opts, data_opts)  # a bad folder fails now
        loader = make_loader_from(data_opts)
        loaded, batches, shape = load_with_data(model, opts, loader, shape, quiet)
        configs = sweep_configs(ranks, energies, targets, orders, input_shape=shape, **common)
        log(f"{len(configs)} settings" + (f", each calibrated on {calib_opts['calib_samples']} "
                                          f"images from {calib_opts['calib_dir']}"
                                          if calib is not None else ""), quiet)
        result = sweep(loaded.model, configs, batches=batches, meta=loaded.meta,
                       latency=lat["latency"], latency_batch=lat["latency_batch"],
                       repeats=lat["repeats"], threads=lat["threads"], calibration=calib,
                       calibration_config=CalibrationConfig(
                           samples=calib_opts["calib_samples"], method=calib_opts["calib_method"]))
        if opts["csv_path"]:
            log(f"wrote {result.to_csv(opts['csv_path'], force=opts['force'])}", quiet)
        if opts["plot_dir"]:
            from pathlib import Path

            from ..measure.plots import SWEEP_FIGURE, plot_sweep
            path = plot_sweep(result.rows, Path(opts["plot_dir"]) / SWEEP_FIGURE,
                              baseline_top1=result.baseline.get("top1"),
                              title=f"{Path(model).name}: {len(result.rows)} settings",
                              force=opts["force"])
            log(f"wrote {path}", quiet)
    emit(result, opts["as_json"])
