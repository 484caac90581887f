"""Fine-tune a decoupled ResNet-56 with the original as teacher, against a control that fine-tunes
the original itself with the same budget. The measurement behind docs/finetune.md.

    python experiments/finetune_resnet.py                      # the recorded settings below
    python experiments/finetune_resnet.py --train-images 5000 --epochs 3 --budget-minutes 60

Why a control: the shared CIFAR-10 images are JPEG re-encodings the original was not trained on
(83.2% top-1 instead of 93.6%), so fine-tuning on them helps the original too; the fair number
is the decomposed model's top-1 minus the control's, both fine-tuned the same way on the same
images and scored on the same test images.

The script estimates the run's time from a few timed steps before it starts and stops if that
exceeds --budget-minutes. Checkpoints go to --workdir, so a killed run continues where it
stopped when started again with the same settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _paths import TEST, TRAIN, load_resnet56

import decompose
from decompose.data import calibration_batches, make_loader
from decompose.io.files import load_model
from decompose.recover.finetune import (
    FinetuneConfig,
    FinetuneReport,
    finetune,
    finetune_control,
)
from decompose.recover.finetune._train_form import dense_training

# ---- the recorded settings (docs/finetune.md) --------------------------------------------------
TARGET_MACS = 0.33     # decomposed layers keep 1/3 of their multiply-adds (ranks: global budget)
TRAIN_IMAGES = 2000    # seeded random subset of the 50k training JPEGs
TEST_IMAGES = 2000     # seeded random subset of the 10k test JPEGs (selection and report)
EPOCHS = 2
BATCH = 64
LR = 0.01              # SGD, momentum 0.9, weight decay 5e-4, cosine to 0, no warm-up
KD_WEIGHT = 0.5        # loss = 0.5 * CE + 0.5 * T^2 * KL(teacher || student), T = 4
TEMPERATURE = 4.0
BUDGET_MINUTES = 25.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    ap.add_argument("--test-images", type=int, default=TEST_IMAGES)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--batch-size", type=int, default=BATCH)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--kd-weight", type=float, default=KD_WEIGHT)
    ap.add_argument("--target-macs", type=float, default=TARGET_MACS)
    ap.add_argument("--rank", type=int, default=None,
                    help="decouple at this rank everywhere instead of --target-macs")
    ap.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is several times faster on a shared, busy CPU")
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("--control-only", action="store_true",
                    help="fine-tune only the control; run it beside a --no-control run (one core "
                         "each), then run again with neither flag to collect both from the "
                         "finished checkpoints")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="label-free calibration on N training images before fine-tuning "
                         "(decompose.calibrate_); 0 = none")
    ap.add_argument("--decomposed", default=None, metavar="FILE",
                    help="fine-tune this decompose file (e.g. made by the CLI with --method auto "
                         "--target-latency 0.7 --calibrate) instead of decomposing here")
    ap.add_argument("--estimate-only", action="store_true", help="time, print, stop")
    ap.add_argument("--workdir", default="/tmp/finetune_resnet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def phase(what: str) -> None:
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {what}", flush=True)

    teacher = load_resnet56()
    if args.decomposed:
        loaded = load_model(args.decomposed)
        student, tot = loaded.model, loaded.meta["totals"]
    else:
        student = copy.deepcopy(teacher)
        rule = {"rank": args.rank} if args.rank else {"target_macs": args.target_macs}
        rep = decompose.decompose_(student, exclude=("conv1",), **rule)
        tot = rep.totals
    print(f"decomposed {tot['layers_decomposed']} convs: their multiply-adds "
          f"{tot['decomposed_macs_before'] / 1e6:.1f}M -> {tot['decomposed_macs_after'] / 1e6:.1f}M "
          f"({tot['decomposed_macs_before'] / tot['decomposed_macs_after']:.2f}x fewer); whole "
          f"model {tot['macs_before'] / 1e6:.1f}M -> {tot['macs_after'] / 1e6:.1f}M MACs, "
          f"params {tot['params_before']} -> {tot['params_after']}", flush=True)

    phase("decomposed")
    if args.calibrate:
        cal = decompose.calibrate_(student, teacher,
                                   calibration_batches(TRAIN, n_samples=args.calibrate),
                                   samples=args.calibrate, progress=False)
        phase(f"calibrated on {cal.samples} images in {cal.seconds:.1f} s")
    train = make_loader(TRAIN, batch_size=args.batch_size, train=True)  # pad-4 crop + flip
    test = make_loader(TEST, batch_size=256)

    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         kd_weight=args.kd_weight, temperature=TEMPERATURE, device="cpu",
                         limit=args.train_images, val_limit=args.test_images, seed=0,
                         checkpoint=str(work / "student.ckpt"), log=str(work / "student.jsonl"))
    ctl = FinetuneConfig.from_dict({**cfg.to_dict(), "checkpoint": str(work / "control.ckpt"),
                                    "log": str(work / "control.jsonl")})

    phase("data indexed")
    # ---- estimate the cost first: a few timed steps of each model, forward passes for scoring
    est = estimate_minutes(student, teacher, args, with_control=not args.no_control,
                           with_student=not args.control_only)
    print(f"estimated {est:.1f} min (budget {args.budget_minutes:.0f} min)", flush=True)
    if args.estimate_only:
        return
    if est > args.budget_minutes:
        raise SystemExit("over budget: lower --train-images/--test-images/--epochs or raise "
                         "--budget-minutes")

    phase("estimated")
    if args.control_only:
        finetune_control(teacher, train, test, config=ctl, resume=Path(ctl.checkpoint).exists())
        phase("control fine-tuned")
        return
    resume = Path(cfg.checkpoint).exists()
    res = finetune(student, train, test, teacher=teacher, config=cfg, resume=resume,
                   output=work / "resnet56.finetuned.pt", force=not resume)
    phase("decomposed model fine-tuned")
    control = None
    if not args.no_control:
        control = finetune_control(teacher, train, test, config=ctl, teacher_score=res.teacher,
                                   resume=Path(ctl.checkpoint).exists())
    phase("done")
    report = FinetuneReport(res, control)
    print(report)
    out = {**report.to_dict(), "decomposition": tot, "wall_minutes":
           round((time.time() - t_start) / 60, 2), "threads": torch.get_num_threads(),
           "estimated_minutes": round(est, 1), "calibration_images": args.calibrate}
    (work / "result.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {work / 'result.json'}; total {out['wall_minutes']} min")


def train_step_seconds(net, teacher, x, y, *, steps: int, warmup: int) -> float:
    """Median wall time of one training step of a copy of ``net`` (the teacher's forward
    included, the training form ``finetune`` uses) on ``x``/``y``'s device, after ``warmup``
    untimed steps; CUDA is synchronised around each step."""
    device = x.device
    net = copy.deepcopy(net).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with dense_training(net, "auto", device):
        for _ in range(warmup + steps):
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                teacher(x)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync()
            times.append(time.perf_counter() - t)
    timed = sorted(times[warmup:])
    return timed[len(timed) // 2]


def estimate_minutes(student, teacher, args, with_control: bool, with_student: bool = True
                     ) -> float:
    """Time 3 training steps (after one warm-up) of the student with the teacher's forward, and
    of the control; add forward passes for the scoring of every epoch and the baselines."""
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))

    def forward_seconds(net) -> float:
        with torch.no_grad():
            net.eval()(x)
            t = time.time()
            net(x)
            return time.time() - t

    s_step = train_step_seconds(student, teacher, x, y, steps=3, warmup=1)
    c_step = train_step_seconds(teacher, teacher, x, y, steps=3, warmup=1)
    s_fwd, t_fwd = forward_seconds(student), forward_seconds(teacher)
    print(f"timing, batch {args.batch_size}: training step {s_step:.2f} s decomposed (teacher "
          f"forward included), {c_step:.2f} s control; forward {s_fwd:.2f} s decomposed, "
          f"{t_fwd:.2f} s original", flush=True)
    steps = -(-args.train_images // args.batch_size) * args.epochs
    evals = -(-args.test_images // args.batch_size) * (args.epochs + 1)  # per epoch + before
    total = (steps * s_step + evals * s_fwd + evals / (args.epochs + 1) * t_fwd) if with_student \
        else 0.0
    if with_control:
        total += steps * c_step + evals * t_fwd
    return total / 60


if __name__ == "__main__":
    main()
