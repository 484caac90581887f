"""Kernel error and planning time of Tucker-2, spatial SVD and channel SVD (and ND beside them)
on the pretrained CIFAR ResNet-20 and ResNet-56 at fractions of the layers' MACs.

Every 3x3 conv but the stem (``exclude=("conv1",)``), input 3x32x32, data-free:

    decompose.plan(model, method=M, target_macs=F, exclude=("conv1",))

The mean relative kernel error is over those layers, a layer kept original counting 0; the
planning time is the wall time of that call (SVDs, menus and the budget optimiser), median of
``--repeats`` runs at ``--threads`` threads. Prints a Markdown table (docs/methods.md).

    python experiments/tucker_svd_errors.py --threads 1 --repeats 3
    python experiments/tucker_svd_errors.py --menu-sizes 8,16,32,64,100000 --methods tucker2
    python experiments/tucker_svd_errors.py --hooi 10 --methods tucker2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decompose
from decompose import methods
from decompose.methods.tucker2 import Tucker2

try:
    from _paths import MODELS
except ImportError:  # run from elsewhere
    from pathlib import Path
    MODELS = Path(__file__).resolve().parents[2] / "shared" / "models" / "cifar-resnet"


def measure(model, method: str, target: float, repeats: int) -> dict:
    times, rep = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        rep = decompose.plan(model, method=method, target_macs=target, exclude=("conv1",))
        times.append(time.perf_counter() - t0)
    layers = [lp for lp in rep.layers if lp.name != "conv1"]
    errs = [lp.kernel_error if lp.skipped is None else 0.0 for lp in layers]
    return {"mean_err": sum(errs) / len(errs), "sum_sq": sum(e * e for e in errs),
            "kept": sum(lp.skipped is not None for lp in layers), "layers": len(layers),
            "ratio": rep.totals["decomposed_macs_ratio"],
            "whole": rep.totals["macs_after"] / rep.totals["macs_before"],
            "seconds": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="20,56")
    ap.add_argument("--targets", default="0.5,0.25")
    ap.add_argument("--methods", default="nd,tucker2,spatial-svd,channel-svd")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--menu-sizes", default="", help="Tucker-2 menu sizes to compare")
    ap.add_argument("--hooi", type=int, default=0, help="Tucker-2 HOOI sweeps (default 0)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    original = methods.get("tucker2")
    sizes = [int(s) for s in a.menu_sizes.split(",") if s] or [original.menu_size]
    print("| model | method | target | mean kernel error | sum of squared errors | layers kept "
          "original | MACs of the layers | planning s |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for depth in map(int, a.depths.split(",")):
            model = decompose.load(MODELS / f"resnet{depth}.th",
                                   arch=f"decompose.models.cifar_resnet:resnet{depth}").eval()
            for name in a.methods.split(","):
                for size in sizes if name == "tucker2" else [None]:
                    if size is not None:
                        methods.register(Tucker2(hooi_iterations=a.hooi, menu_size=size))
                    label = name if size is None or len(sizes) == 1 and not a.hooi else \
                        f"{name} (menu {size}, HOOI {a.hooi})"
                    for target in map(float, a.targets.split(",")):
                        r = measure(model, name, target, a.repeats)
                        print(f"| ResNet-{depth} | {label} | {target} | {r['mean_err']:.4f} | "
                              f"{r['sum_sq']:.3f} | {r['kept']}/{r['layers']} | "
                              f"{r['ratio']:.3f} | {r['seconds']:.2f} |", flush=True)
    finally:
        methods.register(original)


if __name__ == "__main__":
    main()
