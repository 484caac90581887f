"""Label-free calibration of decoupled CIFAR ResNets: top-1 before and after, MACs, time.

From the repository root, with ../shared holding the checkpoints and the CIFAR-10 JPEGs:

    python experiments/calibrate_resnet.py                # all rows, all 10,000 test images
    python experiments/calibrate_resnet.py --test 2000    # a quicker look (seeded subset)

For every row: decompose a copy of the pretrained model (data-free), evaluate it, calibrate it on
512 unlabeled training images (a seeded random subset; their labels are never read), evaluate
again; every model is evaluated on the same test images as the original. Prints a table and
writes docs/results-calibration.md (the table, the exact command, times, threads, load).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

import decompose
from decompose.data import calibration_batches, make_loader
from decompose.measure.evaluate import evaluate
from decompose.models.cifar_resnet import resnet20, resnet56
from decompose.recover.calibrate import calibrate_

# ------------------------------------------------------------------------------------ settings
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DECOMPOSE_SHARED", REPO / ".." / "shared"))
DATA = SHARED / "data" / "cifar10"
MODELS = SHARED / "models" / "cifar-resnet"
CALIB_SAMPLES = 512  # unlabeled training images
CALIB_SEED = 0
TEST_SEED = 1  # only used with --test N < 10,000
EXCLUDE = ("conv1",)  # the 3-channel stem stays dense
BUILDERS = {"resnet20": resnet20, "resnet56": resnet56}
# model, decomposition (keywords of decompose_), calibration methods ("last", "joint")
ROWS = [
    ("resnet20", dict(rank=3, order="dw-pw"), ("last", "joint")),
    ("resnet20", dict(rank=4, order="dw-pw"), ("last", "joint")),
    ("resnet56", dict(target_macs=0.5, order="auto"), ("last", "joint")),
]


def load(name: str) -> torch.nn.Module:
    state = torch.load(MODELS / f"{name}.th", map_location="cpu", weights_only=True)["state_dict"]
    model = BUILDERS[name]()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


def top1(model: torch.nn.Module, test: list) -> float:
    return 100 * evaluate(model, test, progress=False).top1


def describe(kw: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kw.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", type=int, default=None, help="test images (default: all 10,000)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--models", nargs="*", default=None, help="only these models' rows")
    ap.add_argument("--doc", default=str(REPO / "docs" / "results-calibration.md"),
                    help="markdown file to write ('' for none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (DATA / "test").is_dir() or not MODELS.is_dir():
        sys.exit(f"needs {DATA} and {MODELS} (set DECOMPOSE_SHARED to the shared folder)")
    start, load_start = time.time(), os.getloadavg()
    # channels-last batches: the same numbers, several times faster for depthwise/1x1 convs on CPU
    test = [(x.contiguous(memory_format=torch.channels_last), y)
            for x, y in make_loader(DATA / "test", batch_size=500, limit=args.test, seed=TEST_SEED)]
    calib = list(calibration_batches(DATA / "train", n_samples=CALIB_SAMPLES, seed=CALIB_SEED))
    n_test = sum(len(y) for _, y in test)

    rows, refs = [], {}
    for name, kw, methods in ROWS:
        if args.models and name not in args.models:
            continue
        original = load(name)
        if name not in refs:
            refs[name] = top1(original, test)
            rows.append((name, "original", "", "", refs[name], 0.0, None, None))
            print(f"{name} original: {refs[name]:.2f}", flush=True)
        plain = copy.deepcopy(original)
        rep = decompose.decompose_(plain, exclude=EXCLUDE, **kw)
        ratio = rep.totals["decomposed_macs_ratio"]
        acc = top1(plain, test)
        rows.append((name, describe(kw), f"{ratio:.3f}", "none", acc, acc - refs[name], None, None))
        print(f"{name} {describe(kw)} MACs x{ratio:.3f} uncalibrated: {acc:.2f}", flush=True)
        for method in methods:
            model = copy.deepcopy(plain)
            cal = calibrate_(model, original, calib, samples=CALIB_SAMPLES, method=method,
                             progress=False)
            acc = top1(model, test)
            err = sum(lc.error_after for lc in cal.layers) / len(cal.layers)
            rows.append((name, describe(kw), f"{ratio:.3f}", method, acc, acc - refs[name],
                         cal.seconds, err))
            print(f"{name} {describe(kw)} {method}: {acc:.2f} ({acc - refs[name]:+.2f}) "
                  f"calibration {cal.seconds:.1f} s, mean layer error {err:.3f}", flush=True)

    head = ("| model | decomposition | MACs ratio (decomposed layers) | calibration | top-1 % "
            "| vs original | calibration time (s) | mean layer error after |")
    lines = [head, "|" + "---|" * 8]
    for name, dec, ratio, method, acc, delta, secs, err in rows:
        lines.append(f"| {name} | {dec} | {ratio} | {method} | {acc:.2f} | "
                     f"{'' if method in ('', 'none') and not delta else f'{delta:+.2f}'} | "
                     f"{'' if secs is None else f'{secs:.1f}'} | "
                     f"{'' if err is None else f'{err:.3f}'} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.doc:
        cmd = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
        doc = f"""# Calibration results (generated by experiments/calibrate_resnet.py)

Command (repository root): `{cmd}`

- Calibration: {CALIB_SAMPLES} unlabeled images of ../shared/data/cifar10/train (seed
  {CALIB_SEED}), `calibrate_` defaults except its `method` ("last" or "joint").
- Evaluation: {n_test} images of ../shared/data/cifar10/test, the same images for every row.
- Decomposition: every 3x3 conv except the stem (`exclude={EXCLUDE}`); "MACs ratio" is the
  multiply-adds of the decoupled layers over those of the convs they replace.
- "mean layer error after": the mean over layers of `||y_hat - y|| / ||y||` on the
  calibration images (see docs/calibration.md).
- Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__},
  {torch.get_num_threads()} threads; load average {load_start[0]:.1f} at the start and
  {os.getloadavg()[0]:.1f} at the end (other work shared the machine: times are upper bounds).
- Wall time of the whole script: {time.time() - start:.0f} s.

{table}
"""
        Path(args.doc).write_text(doc)
        print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
