"""Does folding BatchNorm into the convs before decoupling help? Accuracy and speed, data-free.

For the shipped CIFAR ResNet-20/56 it compares, at several ranks T and both orders:
  * unfolded: decouple the raw kernels W; the BN stays after the decoupled pair.
  * folded:   fold each BN into its conv first (W' = W * gamma/sqrt(var+eps) per output channel,
              plus a bias), then decouple W'. This is what the method's authors do.
  * unfolded, then folded: decouple W, then fold each BN into the last conv of its decoupled pair
              (exact, so it computes what "unfolded" computes; checked below), which gives the
              same modules, hence the same speed, as "folded".
Both are data-free (no refit). What is measured:
  * top-1 on N_IMAGES seeded test images (JPEG copy in ../shared), and the relative error of the
    logits against the original model's (||y - y0|| / ||y0||, a less noisy signal than accuracy);
  * the kernel error *in the space the next layer sees* (that of W' = s*W), per layer
    ||s*W - s*W_T|| / ||s*W|| for unfolded and ||W' - W'_T|| / ||W'|| for folded, as the RMS over
    decoupled layers. The folded SVD minimises exactly this, so it can only be lower or equal;
  * eager PyTorch latency, original / folded / decoupled / decoupled+folded, interleaved in one
    process (decompose.measure.clock.compare_latency: alternating rounds, median).

    python experiments/bn_folding.py                   # everything (~30 minutes on 2 busy cores)
    python experiments/bn_folding.py --depth 20 --no-latency
    python experiments/bn_folding.py --depth 56 --orders auto,dw-pw --no-latency
    python experiments/bn_folding.py --no-accuracy --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

import decompose
from decompose.engine.fold import find_conv_bn_pairs, fold_batchnorm_
from decompose.io.files import load_model
from decompose.measure.clock import CLOCKS, compare_latency, speedups
from decompose.methods.nd.forms import rebuilt_weight

# ----------------------------------------------------------------------------- settings
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
DATA = SHARED / "data" / "cifar10" / "test"
MODELS = SHARED / "models" / "cifar-resnet"
DEPTHS = (20, 56)
RANKS = (1, 2, 3, 4)
ORDERS = ("auto", "dw-pw", "pw-dw")
EXCLUDE = ("conv1",)          # the 3-channel stem, as in docs/METHOD.md's figures
N_IMAGES = 2000               # seeded subset of the 10,000 test images
LAT_RANKS = (1, 2)
LAT_BATCHES = (1, 64)
LAT_REPEATS = 30
# wall clock, and (with --threads 1) CPU time of the calling thread, which runs every op when
# torch has one thread: on a shared, overloaded machine the wall-clock median mostly measures
# how often a run is preempted, the CPU time not.


def load_pretrained(depth: int) -> nn.Module:
    """resnet{depth} with the shipped weights, through the safe loader."""
    path = MODELS / f"resnet{depth}.th"
    return load_model(path, arch=f"decompose.models.cifar_resnet:resnet{depth}").model.eval()


def cached_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from decompose.data import make_loader
    return list(make_loader(DATA, batch_size=250, limit=n))


@torch.inference_mode()
def logits_of(model: nn.Module, batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x, _ in batches])


def top1(logits: torch.Tensor, batches) -> float:
    labels = torch.cat([y for _, y in batches])
    return float((logits.argmax(1) == labels).float().mean())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bn_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """conv name -> gamma / sqrt(var + eps) of the BN that follows it."""
    out = {}
    for conv, bn_name in find_conv_bn_pairs(model):
        bn = model.get_submodule(bn_name)
        out[conv] = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    return out


def seen_error(base: nn.Module, scales: dict, decoupled: nn.Module, names, folded: bool) -> float:
    """RMS over layers of the relative kernel error in the folded (next-layer) space."""
    errs = []
    for name in names:
        w = base.get_submodule(name).weight.detach().double()
        w_t, _ = rebuilt_weight(decoupled.get_submodule(name))
        w_t = w_t.double()
        s = scales[name].reshape(-1, *([1] * (w.dim() - 1)))
        target = s * w
        approx = w_t if folded else s * w_t  # a folded model's kernels already carry s
        errs.append(float((target - approx).norm() / target.norm()))
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def decoupled(model: nn.Module, rank: int, order: str, fold: bool, fold_after: bool = False):
    m = copy.deepcopy(model)
    if fold:
        fold_batchnorm_(m)
    rep = decompose.decompose_(m, rank=rank, order=order, exclude=EXCLUDE)
    if fold_after:
        fold_batchnorm_(m)
    return m.eval(), rep


def accuracy_rows(depth: int, base: nn.Module, batches, orders) -> list[dict]:
    ref = logits_of(base, batches)
    rows = [{"depth": depth, "variant": "original", "top1": top1(ref, batches)}]
    folded_base = copy.deepcopy(base)
    fold_batchnorm_(folded_base)
    rows.append({"depth": depth, "variant": "original, folded",
                 "top1": top1(logits_of(folded_base, batches), batches),
                 "logit_rel_err": rel(logits_of(folded_base, batches), ref)})
    for row in rows:
        print(json.dumps(row), flush=True)
    scales = bn_scales(base)
    for order in orders:
        for rank in RANKS:
            for fold in (False, True):
                m, rep = decoupled(base, rank, order, fold)
                names = [lp.name for lp in rep.decomposed]
                out = logits_of(m, batches)
                chosen = [lp.order for lp in rep.decomposed]
                rows.append({
                    "depth": depth, "variant": "folded" if fold else "unfolded", "order": order,
                    "rank": rank, "top1": top1(out, batches), "logit_rel_err": rel(out, ref),
                    "seen_kernel_err": seen_error(base, scales, m, names, fold),
                    "layers_dw_pw": chosen.count("dw-pw"), "layers": len(chosen)})
                if not fold:
                    after, _ = decoupled(base, rank, order, False, fold_after=True)
                    rows[-1]["fold_after_vs_unfolded"] = rel(logits_of(after, batches), out)
                print(json.dumps(rows[-1]), flush=True)
    return rows


def latency_rows(depth: int, base: nn.Module, threads: int) -> list[dict]:
    rows = []
    folded_base = copy.deepcopy(base)
    fold_batchnorm_(folded_base)
    for batch in LAT_BATCHES:
        x = torch.randn(batch, 3, 32, 32)
        mods = {"original": base, "original, folded": folded_base}
        for rank in LAT_RANKS:
            mods[f"T={rank}"] = decoupled(base, rank, "auto", False)[0]
            mods[f"T={rank}, folded"] = decoupled(base, rank, "auto", True)[0]
        for clock in CLOCKS if threads == 1 else ("wall",):
            res = compare_latency(mods, x, repeats=LAT_REPEATS, warmup=3, threads=threads,
                                  timer=CLOCKS[clock])
            up = speedups(res, "original")
            for name, lat in res.items():
                rows.append({"depth": depth, "batch": batch, "model": name, "clock": clock,
                             "median_ms": round(lat.median_ms, 3), "q1_ms": round(lat.q1_ms, 3),
                             "q3_ms": round(lat.q3_ms, 3),
                             "speedup_vs_original": round(up[name], 3), "threads": lat.threads})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, action="append", help="20 and/or 56 (default both)")
    ap.add_argument("--images", type=int, default=N_IMAGES)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--orders", default=",".join(ORDERS), help="comma-separated, default all")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads for the latency runs (default: torch's count)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "latency_threads": args.threads,
                      "images": args.images, "exclude": EXCLUDE}), flush=True)
    batches = None if args.no_accuracy else cached_batches(args.images)
    for depth in args.depth or DEPTHS:
        base = load_pretrained(depth)
        if batches is not None:
            accuracy_rows(depth, base, batches, args.orders.split(","))
        if not args.no_latency:
            latency_rows(depth, base, args.threads)


if __name__ == "__main__":
    main()
