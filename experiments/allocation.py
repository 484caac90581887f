"""Kernel-error vs output-error rank allocation (``--allocate``) on ResNet-56, after calibration.

    python experiments/allocation.py --targets 0.33,0.5 --test-images 2000

For each MACs budget: decouple every 3x3 conv but the stem with the budget spread by kernel
error, and by output error measured on the first 128 of 512 unlabeled training images
(``decompose.planning.sensitivity``); calibrate both on the same 512 images (``decompose_``); score both
on the same seeded test subset. Prints one line per (budget, allocation).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _paths import TEST, TRAIN, load_resnet56

import decompose
from decompose.data import calibration_batches, make_loader
from decompose.measure.compare import cache_batches, evaluate_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="0.33")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    original = load_resnet56()
    test = cache_batches(make_loader(TEST, batch_size=256, limit=args.test_images, seed=0),
                         quiet=True)
    calib = list(calibration_batches(TRAIN, n_samples=args.calib_images))
    base = evaluate_model(original, test, quiet=True)
    print(f"original: top-1 {base['top1']:.2%} on {base['images']} test images", flush=True)
    for target in [float(v) for v in args.targets.split(",")]:
        for allocation in ("kernel", "output"):
            model = copy.deepcopy(original)
            t = time.perf_counter()
            rep = decompose.decompose_(model, decompose.DecomposeConfig(
                target_macs=target, allocation=allocation, exclude=("conv1",),
                input_shape=(3, 32, 32)), calibration=calib,
                calibration_config=decompose.CalibrationConfig(samples=args.calib_images),
                original=original, progress=False)
            seconds = time.perf_counter() - t
            acc = evaluate_model(model, test, quiet=True)["top1"]
            tot = rep.totals
            ranks = [lp.rank for lp in rep.decomposed]
            print(f"target_macs {target} allocation {allocation}: top-1 {acc:.2%} "
                  f"(drop {100 * (base['top1'] - acc):.2f}), {len(ranks)} layers, decoupled "
                  f"MACs {tot['decomposed_macs_after'] / tot['decomposed_macs_before']:.3f}x, "
                  f"ranks {ranks}, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
