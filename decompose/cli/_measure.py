"""Options shared by the commands that measure: data (--data, preprocessing, --limit), latency
(--latency, --latency-batch, --threads, --repeats), calibration (--calibrate, --calib-samples,
--calib-method) and list flags (--ranks 1,2,3).

Parsing only: the measuring itself is :mod:`decompose.measure` and :mod:`decompose.sweep`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..data.spec import MAX_SIDE
from ..errors import DecomposeError
from ._common import positive

DATA_KEYS = ["data", "limit", "seed", "batch_size", "resize", "crop", "mean", "std", "grayscale"]
LATENCY_KEYS = ["latency", "latency_batch", "threads", "repeats"]
CALIB_KEYS = ["calib_dir", "calib_samples", "calib_method"]


def parse_list(text: str | None, flag: str, kind: type, example: str) -> list[Any]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; a one-line DecomposeError naming the flag otherwise."""
    if text is None:
        return []
    parts = [p.strip() for p in str(text).split(",")]
    word = "integers" if kind is int else "numbers"
    try:
        if not parts or any(p == "" for p in parts):
            raise ValueError
        return [kind(p) for p in parts]
    except ValueError:
        raise DecomposeError(f"{flag} must be comma-separated {word}, got {text!r}; e.g. "
                             f"{flag} {example}") from None


def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    return tuple(parse_list(text, flag, float, "0.485,0.456,0.406"))


def data_options(required: bool = False) -> Callable[[Callable], Callable]:
    """--data and how its images become tensors (decompose.data.make_loader's arguments)."""
    def deco(f: Callable) -> Callable:
        opts = [
            click.option("--data", metavar="DIR", required=required,
                         type=click.Path(exists=False, file_okay=True, dir_okay=True),
                         help="Labelled images: a folder of class sub-folders (DIR/<class>/*.jpg, "
                              "sorted names = labels) or an .npz with x and y."
                              + ("" if required else " Adds accuracy and output error to the "
                                 "report.")),
            click.option("--limit", type=int, callback=positive, metavar="N",
                         help="Use a seeded random subset of N images (same ones every run)."),
            click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0,
                         show_default=True, help="Seed of the --limit subset (0 to 4294967295)."),
            click.option("--batch-size", type=int, default=128, show_default=True,
                         callback=positive, help="Images per evaluation batch."),
            click.option("--resize", type=click.IntRange(1, MAX_SIDE), metavar="PX",
                         help=f"Resize the shorter side to PX pixels first (1 to {MAX_SIDE})."),
            click.option("--crop", type=click.IntRange(1, MAX_SIDE), metavar="PX",
                         help=f"Then center-crop to PX x PX (1 to {MAX_SIDE})."),
            click.option("--mean", metavar="M[,M,M]",
                         help="Normalisation mean. Default ImageNet's 0.485,0.456,0.406 (what the "
                              "CIFAR ResNets were trained with)."),
            click.option("--std", metavar="S[,S,S]",
                         help="Normalisation std. Default ImageNet's 0.229,0.224,0.225."),
            click.option("--grayscale", is_flag=True,
                         help="Read images as one channel (default mean/std then 0.449/0.226)."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


def latency_options(f: Callable) -> Callable:
    """--latency/--no-latency, --latency-batch, --threads, --repeats."""
    opts = [
        click.option("--latency/--no-latency", default=True, show_default=True,
                     help="Time the original and the decomposed model side by side (whole model "
                          "and every decoupled layer)."),
        click.option("--latency-batch", type=int, default=1, show_default=True,
                     callback=positive, metavar="N", help="Batch size of the timed input."),
        click.option("--threads", type=int, callback=positive, metavar="N",
                     help="torch threads while timing. Default: torch's current setting."),
        click.option("--repeats", type=int, default=20, show_default=True, callback=positive,
                     metavar="N", help="Interleaved timed rounds per comparison (median)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def calibration_options(f: Callable) -> Callable:
    """--calibrate DIR, --calib-samples N, --calib-method joint|last."""
    opts = [
        click.option("--calibrate", "calib_dir", type=click.Path(), metavar="DIR",
                     help="Refit the decoupled layers without labels to the original's layer "
                          "outputs on images from DIR (folder or .npz; labels ignored), same "
                          "preprocessing flags as --data."),
        click.option("--calib-samples", type=int, default=512, show_default=True, metavar="N",
                     help="Calibration images (a seeded random subset)."),
        click.option("--calib-method", type=click.Choice(["joint", "last"]), default="joint",
                     show_default=True,
                     help="joint: refit both convs of each layer (alternating least squares); "
                          "last: only the conv that produces the output."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def calibration_batches_from(calib: dict[str, Any], data_opts: dict[str, Any]):
    """The --calibrate images (opened now, so a bad folder fails before any work), or None.

    A one-shot iterator over at most --calib-samples images (decoded as they are read)."""
    if not calib["calib_dir"]:
        return None
    if calib["calib_samples"] < 1:
        raise click.BadParameter("must be at least 1", param_hint="--calib-samples")
    from ..data import calibration_batches
    return calibration_batches(calib["calib_dir"], n_samples=calib["calib_samples"],
                               seed=data_opts["seed"], **preprocessing(data_opts))


def preprocessing(opts: dict[str, Any]) -> dict[str, Any]:
    """make_loader's preprocessing keywords from the data flags."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if opts["grayscale"]:  # one channel: the average of ImageNet's three
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return dict(resize=opts["resize"], crop=opts["crop"],
                mean=parse_floats(opts["mean"], "--mean") or mean,
                std=parse_floats(opts["std"], "--std") or std,
                grayscale=opts["grayscale"])


def make_loader_from(opts: dict[str, Any]):
    """The DataLoader for --data and its preprocessing flags, or None without --data."""
    if not opts.get("data"):
        return None
    from ..data import make_loader
    return make_loader(opts["data"], batch_size=opts["batch_size"], limit=opts["limit"],
                       seed=opts["seed"], **preprocessing(opts))
