"""How long CP (``cp``, ``cp4``) takes to plan and build a whole model, and the kernel errors it
reaches (issue 11; docs/methods.md has the results).

* ``resnet56``: the shipped pretrained CIFAR ResNet-56, every 3x3 conv but the stem (conv1),
  at each ``--targets`` fraction of those layers' MACs (``--target-macs``), input 3x32x32.
* ``vgg16``: VGG16's 13 convs (64-512 channels, 3x3, padding 1) at 224x224 with random weights
  (seed 0; only the time means anything: a random kernel has no low-rank structure), all
  convs decomposed, the progress bars on stderr.

Prints, per model, method and target: wall and process-CPU seconds of ``decompose_`` (planning:
the ALS fits of every layer's menu, the budget, building), the machine's load average, the
MACs ratio of the decomposed layers and the mean / median / max relative kernel error over
them. The fit cache is cleared before every run, so each one fits from scratch.

``convergence``: on one ResNet-56 conv per stage, the error of the menu's fit at the rank
nearest half the MACs (what the budget sees) against the same fit continued for more ALS
sweeps, and against tensorly's parafac from its SVD initialisation without the ridge.

    python experiments/cp_speed.py resnet56 --methods cp,cp4 --targets 0.5,0.25
    python experiments/cp_speed.py vgg16 --methods cp --targets 0.5
    python experiments/cp_speed.py convergence --methods cp,cp4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from _paths import load_resnet56
from torch import nn

import decompose
from decompose.methods import cp as cp_method

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    """VGG16's convolutional trunk (13 3x3 convs with ReLU, 5 max-pools) and a linear head on
    globally pooled features (the head is not decomposed, so its size does not matter)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def vgg16(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return VGG16().eval()


def run(which: str, method: str, target: float) -> dict:
    if which == "resnet56":
        model, shape, exclude = load_resnet56(), (3, 32, 32), ("conv1",)
    else:
        model, shape, exclude = vgg16(), (3, 224, 224), ()
    cp_method.clear_cache()
    wall, cpu = time.perf_counter(), time.process_time()
    rep = decompose.decompose_(model, method=method, target_macs=target, input_shape=shape,
                               exclude=exclude)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    errs = [lp.kernel_error for lp in rep.decomposed]
    return {"model": which, "method": method, "target": target, "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "load_avg_1min": round(os.getloadavg()[0], 1),
            "torch_threads": torch.get_num_threads(),
            "layers": len(errs), "kept": rep.totals["layers_skipped"],
            "macs_ratio": round(rep.totals["decomposed_macs_ratio"], 4),
            "kernel_error_mean": round(statistics.mean(errs), 4),
            "kernel_error_median": round(statistics.median(errs), 4),
            "kernel_error_max": round(max(errs), 4)}


def convergence(method: str) -> None:
    from decompose.engine.trace import trace
    from decompose.kernels import cp as kcp
    model = load_resnet56()
    calls = trace(model, (3, 32, 32))
    m = decompose.methods.get(method)
    for name in ("layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1"):
        conv = model.get_submodule(name)
        w = conv.weight.detach()
        (cand,) = m.candidates(conv, calls[name])
        dense = w.numel() * math.prod(calls[name].out_shape[2:])
        i = min(range(len(cand)), key=lambda j: abs(cand.macs[j] - dense / 2))
        r, f = cand.ranks[i], cand.state["fits"][cand.ranks[i]]
        row = {"method": method, "layer": name, "rank": r, "menu_error": round(cand.errors[i], 4)}
        t, done = time.perf_counter(), 0
        for extra in (100, 400):  # the same fit continued: +100, then +500 sweeps in all
            f = kcp.fit(w, r, 1, f.modes, init=f, n_iter_max=extra, tol=0,
                        l2_reg=cp_method.L2_REG)
            done += extra
            row[f"plus_{done}_sweeps"] = round(kcp.relative_error(w, f), 4)
        row["seconds_more"] = round(time.perf_counter() - t, 1)
        plain = kcp.fit(w, r, 1, f.modes, n_iter_max=500, tol=0)
        lam, _ = kcp.normalized(plain)
        row["tensorly_no_ridge_500"] = round(kcp.relative_error(w, plain), 4)
        row["its_degeneracy"] = round(float(lam.pow(2).sum() / w.double().pow(2).sum()), 1)
        lam, _ = kcp.normalized(cand.state["fits"][r])
        row["menu_degeneracy"] = round(float(lam.pow(2).sum() / w.double().pow(2).sum()), 2)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["resnet56", "vgg16", "convergence"])
    ap.add_argument("--methods", default="cp,cp4")
    ap.add_argument("--targets", default="0.5,0.25")
    a = ap.parse_args()
    if a.model == "convergence":
        for method in a.methods.split(","):
            convergence(method)
        return
    for method in a.methods.split(","):
        for target in map(float, a.targets.split(",")):
            print(json.dumps(run(a.model, method, target)), flush=True)


if __name__ == "__main__":
    main()
