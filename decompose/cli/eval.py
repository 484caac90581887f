"""``decompose eval MODEL --data DIR``: top-1, top-5, mean loss and image count of one model."""

from __future__ import annotations

import click

from ..io.files import load_model
from ..progress import quiet_progress
from ._common import emit, log, model_options
from ._measure import DATA_KEYS, data_options, make_loader_from


class EvalReport(dict):
    """The eval result: a dict for ``--json``, a few aligned lines for the table."""

    def to_dict(self) -> dict:
        return dict(self)

    def __str__(self) -> str:
        k = self.get("k", 5)
        return "\n".join([
            f"model   {self['model']}",
            f"data    {self['data']} ({self['images']} images)",
            f"top-1   {self['top1']:.2%}",
            f"top-{k}   {self['top5']:.2%}",
            f"loss    {self['loss']:.4f} (mean cross-entropy)",
        ])


@click.command("eval")
@click.argument("model", type=click.Path(dir_okay=True))
@data_options(required=True)
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr.")
def eval_cmd(model: str, **opts) -> None:
    """Measure MODEL's accuracy on labelled images: top-1, top-5, mean loss, number of images.

    Works on original models and on files written by decompose alike; compare the two on the
    same --data (and the same --limit/--seed) to see what decomposing cost.

    \b
    Examples:
      decompose eval resnet20.th --arch decompose.models.cifar_resnet:resnet20 --data cifar10/test
      decompose eval resnet20.decomposed.pt --data cifar10/test --limit 2000 --json
      decompose eval model.pt --data imgs/ --resize 256 --crop 224
    """
    from ..measure.compare import evaluate_model
    loader = make_loader_from({k: opts[k] for k in DATA_KEYS})
    loaded = load_model(model, arch=opts["arch"], allow=opts["allow"], trust=opts["trust"],
                        allow_functions=opts["allow_functions"])
    log(f"loaded {model} ({loaded.kind}, {type(loaded.model).__name__}); "
        f"{len(loader.dataset)} images in {opts['data']}", opts["quiet"])
    net = loaded.model
    _check_shape(net, loaded.meta, loader)
    with quiet_progress(opts["quiet"]):
        res = evaluate_model(net, loader, desc="eval")
    res.update(model=str(model), data=str(opts["data"]),
               classes=len(getattr(loader.dataset, "classes", []) or []))
    emit(EvalReport(res), opts["as_json"])


def _check_shape(net, meta, loader) -> None:
    """Models without ``input_shape`` but saved by decompose carry the shape in their file."""
    from ..data import check_input_shape
    if getattr(net, "input_shape", None) or not meta.get("input_shape"):
        return  # evaluate() checks model.input_shape itself
    x, _ = loader.dataset[0]
    check_input_shape(tuple(meta["input_shape"]), tuple(x.shape))
