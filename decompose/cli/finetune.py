"""``decompose finetune DECOMPOSED --data TRAIN --val VAL --epochs N``: recover accuracy.

Parsing and printing only: the loop is :func:`decompose.recover.finetune.finetune`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..data.spec import MAX_SIDE
from ..errors import DecomposeError
from ..io.write import check_target, protect_inputs
from ._common import emit, log, model_options


def _path_with(out: Path, suffix: str) -> str:
    """``model.finetuned.pt`` -> ``model.finetuned<suffix>`` next to it."""
    return str(out.with_name(out.stem + suffix))


def _control_name(log_path: str) -> str:
    """``x.log.jsonl`` -> ``x.control.log.jsonl``; ``x.csv`` -> ``x.control.csv``."""
    if log_path.endswith(".log.jsonl"):
        return log_path[: -len(".log.jsonl")] + ".control.log.jsonl"
    p = Path(log_path)
    return str(p.with_name(p.stem + ".control" + p.suffix))


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise DecomposeError(f"{flag} must be comma-separated numbers, got {text!r}; e.g. "
                             f"{flag} 0.485,0.456,0.406") from None


def _loaders(opts: dict[str, Any]):
    from ..data import make_loader
    pre = dict(resize=opts["resize"], crop=opts["crop"], mean=_floats(opts["mean"], "--mean"),
               std=_floats(opts["std"], "--std"), grayscale=opts["grayscale"])
    # limits and shuffling are applied by finetune() (seeded), so the loaders read everything
    train = make_loader(opts["data"], batch_size=opts["batch_size"], train=opts["augment"],
                        **pre)
    val = make_loader(opts["val"], batch_size=opts["batch_size"], **pre)
    return train, val


@click.command("finetune")
@click.argument("decomposed", type=click.Path(dir_okay=True))
@click.option("--data", required=True, metavar="DIR",
              help="Labelled training images: a folder of class sub-folders or an .npz with x, y.")
@click.option("--val", required=True, metavar="DIR",
              help="Labelled validation images, same classes; the best epoch by top-1 on it is "
                   "kept.")
@click.option("--epochs", type=int, required=True, help="Passes over the training images.")
@click.option("--teacher", metavar="ORIGINAL", type=click.Path(dir_okay=True),
              help="The original model: distilled from (--kd-weight, default 0.5) and reported.")
@model_options
@click.option("--lr", type=float, default=0.01, show_default=True, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd",
              show_default=True, help="SGD with momentum, or AdamW (try --lr 1e-3).")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--nesterov", is_flag=True, help="Nesterov momentum (SGD).")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine",
              show_default=True, help="Learning rate per step: cosine to --min-lr, or constant.")
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True,
              help="Linear warm-up from 0 over this many epochs (may be fractional).")
@click.option("--min-lr", type=float, default=0.0, show_default=True,
              help="Final learning rate of the cosine schedule.")
@click.option("--kd-weight", type=float, metavar="W",
              help="Weight of the distillation term, 0..1: loss = (1-W)*CE + W*T^2*KL. "
                   "Default 0.5 with --teacher, else 0.")
@click.option("--temperature", type=float, default=4.0, show_default=True,
              help="Distillation temperature T.")
@click.option("--batch-size", type=int, default=128, show_default=True,
              help="Images per step (per process under torchrun).")
@click.option("--limit", type=int, metavar="N", help="Train on a seeded random N images.")
@click.option("--val-limit", type=int, metavar="N", help="Validate on a seeded random N images.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Data-loading worker processes.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seeds shuffling, augmentation and the --limit subsets (0 to 4294967295).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="auto = CUDA when available.")
@click.option("--threads", type=int, metavar="N",
              help="torch CPU threads. Default: torch's. On a busy shared CPU 1 can be several "
                   "times faster than 2.")
@click.option("--train-form", type=click.Choice(["auto", "plain", "dense"]), default="auto",
              show_default=True,
              help="How decoupled layers compute while training: dense = one conv with the "
                   "kernel composed from the factors (same function, faster on CPU); auto = "
                   "dense on CPU for rank >= 2. The saved model is decoupled either way.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Random crop (4-pixel zero padding) + horizontal flip: the CIFAR recipe.")
@click.option("--resize", type=click.IntRange(1, MAX_SIDE), metavar="PX",
              help=f"Resize the shorter side to PX first (1 to {MAX_SIDE}).")
@click.option("--crop", type=click.IntRange(1, MAX_SIDE), metavar="PX",
              help=f"Then center-crop to PX x PX (1 to {MAX_SIDE}).")
@click.option("--mean", metavar="M[,M,M]", help="Normalisation mean. Default ImageNet's.")
@click.option("--std", metavar="S[,S,S]", help="Normalisation std. Default ImageNet's.")
@click.option("--grayscale", is_flag=True, help="Read images as one channel.")
@click.option("--control", is_flag=True,
              help="Also fine-tune a copy of --teacher with the same settings and report the "
                   "drop against it (fair when the data differs from the original's).")
@click.option("-o", "--output", type=click.Path(),
              help="Best model (by val top-1). Default: DECOMPOSED.finetuned.pt next to it.")
@click.option("--checkpoint", type=click.Path(),
              help="Checkpoint, written every epoch and on Ctrl-C. Default: OUTPUT's name "
                   "with .ckpt.")
@click.option("--log", "log_path", type=click.Path(),
              help="Per-epoch log: JSON lines, or CSV for a .csv name. Default: OUTPUT's name "
                   "with .log.jsonl.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint of an earlier run.")
@click.option("--force", is_flag=True,
              help="Overwrite an existing output and log, and start over instead of resuming "
                   "(never an input, a folder, a device or a FIFO).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr.")
def finetune_cmd(decomposed: str, **o: Any) -> None:
    """Fine-tune DECOMPOSED on labelled images, with the original as teacher.

    Writes the best epoch's model (DECOMPOSED.finetuned.pt; never overwriting without --force),
    a checkpoint after every epoch and on Ctrl-C (continue with --resume), and a per-epoch log;
    prints top-1/top-5 of the original, and of the decomposed model before and after.
    Under torchrun it trains with DistributedDataParallel; only rank 0 writes.

    \b
    Examples:
      decompose finetune r56.decomposed.pt --data cifar10/train --val cifar10/test --epochs 5 \\
          --teacher resnet56.th --arch decompose.models.cifar_resnet:resnet56
      decompose finetune small.pt --data train/ --val val/ --epochs 3 --limit 5000 --json
      decompose finetune small.pt --data train/ --val val/ --epochs 3 --resume
      torchrun --nproc_per_node 2 --no-python decompose finetune small.pt --data train/ \\
          --val val/ --epochs 3 --device cpu
    """
    from ..recover import finetune as ft

    if o["output"]:
        check_target(o["output"], force=True)  # the name itself (e.g. a trailing "/"): now
    out = Path(o["output"]) if o["output"] else Path(decomposed).with_name(
        f"{Path(decomposed).stem}.finetuned.pt")
    if o["control"] and not o["teacher"]:
        raise DecomposeError("--control fine-tunes a copy of the original; give it with "
                             "--teacher ORIGINAL")
    if o["resume"] and o["force"]:
        raise DecomposeError("--resume continues a run and --force starts it over; pass one")
    cfg = ft.FinetuneConfig(
        epochs=o["epochs"], lr=o["lr"], optimizer=o["optimizer"], momentum=o["momentum"],
        nesterov=o["nesterov"], weight_decay=o["weight_decay"], schedule=o["schedule"],
        warmup_epochs=o["warmup_epochs"], min_lr=o["min_lr"], kd_weight=o["kd_weight"],
        temperature=o["temperature"], batch_size=o["batch_size"], device=o["device"],
        seed=o["seed"], limit=o["limit"], val_limit=o["val_limit"], num_workers=o["workers"],
        train_form=o["train_form"],
        log=o["log_path"] or _path_with(out, ".log.jsonl"),
        checkpoint=o["checkpoint"] or _path_with(out, ".ckpt"))
    control_cfg = None
    if o["control"]:
        control_cfg = ft.FinetuneConfig.from_dict({
            **cfg.to_dict(), "checkpoint": _path_with(Path(cfg.checkpoint), ".control.ckpt"),
            "log": _control_name(cfg.log)})
    resume_control = bool(control_cfg and o["resume"] and Path(control_cfg.checkpoint).exists())
    with protect_inputs(decomposed, o["teacher"], o["data"], o["val"]):
        _finetune(decomposed, o, out, cfg, control_cfg, resume_control)


def _finetune(decomposed: str, o: dict[str, Any], out: Path, cfg: Any, control_cfg: Any,
              resume_control: bool) -> None:
    from ..io.files import load_model
    from ..progress import quiet_progress
    from ..recover import finetune as ft
    from ..recover.finetune._distributed import distributed_env, resolve_device

    # everything that can be refused is refused before any model or image is read
    ft.check_outputs(out, cfg, force=o["force"], resume=o["resume"])
    if control_cfg:
        ft.check_outputs(None, control_cfg, force=o["force"], resume=resume_control)

    if o["threads"] is not None:
        if o["threads"] < 1:
            raise DecomposeError(f"--threads must be >= 1, got {o['threads']}; e.g. --threads 1")
        import torch
        torch.set_num_threads(o["threads"])
    d = distributed_env()
    resolve_device(cfg.device, d)  # --device cuda without a GPU: refused before loading
    quiet = o["quiet"] or not d.main
    student = load_model(decomposed, allow=o["allow"], trust=o["trust"],
                         allow_functions=o["allow_functions"])
    teacher = None
    if o["teacher"]:
        teacher = load_model(o["teacher"], arch=o["arch"], allow=o["allow"],
                             trust=o["trust"], allow_functions=o["allow_functions"]).model
    train, val = _loaders(o)
    log(f"fine-tuning {decomposed} ({type(student.model).__name__}) on {len(train.dataset)} "
        f"images of {o['data']}, validating on {len(val.dataset)} of {o['val']}", quiet)
    meta = {**student.meta, "finetuned_from": str(decomposed)}
    try:
        with quiet_progress(quiet):
            result = ft.finetune(student.model, train, val, teacher=teacher, config=cfg,
                                 output=out, output_meta=meta, force=o["force"],
                                 resume=o["resume"], progress=not quiet)
            control = None
            if control_cfg:
                log("control: fine-tuning a copy of the original with the same settings", quiet)
                control = ft.finetune_control(
                    teacher, train, val, config=control_cfg,
                    teacher_score=result.teacher, resume=resume_control, force=o["force"],
                    progress=not quiet)
    except ft.FinetuneInterrupted as e:
        click.echo(str(e), err=True)  # not an error: the run can go on with --resume
        raise click.exceptions.Exit(130 if e.signal_name == "SIGINT" else 143) from None
    finally:
        ft.shutdown_distributed()
    if d.main:
        emit(ft.FinetuneReport(result, control), o["as_json"])
        log(f"wrote {out}; checkpoint {cfg.checkpoint}; log {cfg.log}", quiet)
