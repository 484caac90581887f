"""``decompose MODEL --rank T``: the main job, and ``decompose report``: the same, dry run."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from ..io import check_writable, default_output, load_model, save_model
from ..metrics import infer_input_shape
from ._common import RANK_KEYS, config_from_options, emit, log, model_options, pop_keys, rank_options


def decompose_file(model_path: str, config, *, arch=None, allow=(), trust=False, output=None,
                   force=False, quiet=False, write=True):
    """Load, plan, (decouple, save). Returns (report, loaded, output path or None)."""
    out = Path(output) if output else default_output(model_path)
    if write:
        check_writable(out, force)  # fail before any work
    loaded = load_model(model_path, arch=arch, allow=allow, trust=trust)
    log(f"loaded {model_path} ({loaded.kind}, {type(loaded.model).__name__})", quiet)
    model = loaded.model
    if not write:
        return api.plan(model, config, meta=loaded.meta), loaded, None
    report = api.decompose_(model, config, meta=loaded.meta)
    if not report.decomposed:
        return report, loaded, None
    meta = {
        "config": config.to_dict(),
        "input_shape": list(report.input_shape),
        "source": str(model_path),
        "arch": loaded.meta.get("arch", arch),
        "totals": report.totals,
        "layers": [{"name": lp.name, "order": lp.order, "rank": lp.rank}
                   for lp in report.decomposed],
    }
    report.output = str(save_model(model, out, meta, force=force))
    return report, loaded, out


def _nothing_to_do(report, model_path: str) -> None:
    reasons = sorted({lp.skipped for lp in report.layers if lp.skipped})
    why = "; ".join(reasons[:3]) if reasons else "it has no Conv1d/2d/3d layer"
    raise click.ClickException(f"no layer of {model_path} can be decoupled ({why}); nothing "
                               "written. Check --include/--exclude, or use a model with k x k convs")


@click.command("run")
@click.argument("model", type=click.Path(dir_okay=True))
@rank_options
@model_options
@click.option("-o", "--output", type=click.Path(), help="Where to write the decomposed model. "
              "Default: MODEL.decomposed.pt next to MODEL.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr.")
def run_cmd(model: str, **opts) -> None:
    """Decouple every k x k convolution of MODEL into depthwise + pointwise pieces.

    Writes MODEL.decomposed.pt (never overwriting without --force) and prints a per-layer report.

    \b
    Examples:
      decompose model.pt --rank 1
      decompose resnet20.th --arch decompose.models.cifar_resnet:resnet20 --energy 0.9 --json
      decompose model.pt --target-macs 0.4 --exclude conv1 -o small.pt
    """
    config = config_from_options(**pop_keys(opts, RANK_KEYS))
    report, _, out = decompose_file(model, config, arch=opts["arch"], allow=opts["allow"],
                                    trust=opts["trust"], output=opts["output"],
                                    force=opts["force"], quiet=opts["quiet"])
    if out is None:
        _nothing_to_do(report, model)
    emit(report, opts["as_json"])
    log(f"wrote {out}", opts["quiet"])


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
                                       trust=opts["trust"], write=False, quiet=True)
    if loaded.kind == "decomposed":
        report.extra["already_decomposed"] = loaded.meta.get("layers", [])
        shape, _ = infer_input_shape(loaded.model, config.input_shape, loaded.meta)
        log(f"{model} was written by decompose: {len(loaded.meta.get('layers', []))} layers "
            f"decoupled from {loaded.meta.get('source')}")
    emit(report, opts["as_json"])
