"""How sure is a gap between two models scored on the same images? Paired per-image comparison.

    python experiments/paired_gap.py /tmp/ft50k/resnet56.finetuned.pt /tmp/ft50k/control.ckpt

Scores both models on the full CIFAR-10 test set (the first argument: a decompose file; the
second: a decompose file or a fine-tuning checkpoint, whose best weights are loaded into the
shipped ResNet-56 architecture) and prints the top-1 of each, the gap (second minus first),
its paired standard error sqrt(b + c - (c - b)^2 / n) / n from the discordant images (b: only
the first right, c: only the second right) and an exact two-sided McNemar (sign) test.
"""

from __future__ import annotations

import argparse
import math

import torch
from _paths import TEST, load_resnet56

from decompose.data import make_loader


def load(path: str) -> torch.nn.Module:
    if path.endswith(".ckpt"):
        ck = torch.load(path, weights_only=True)
        model = load_resnet56()
        model.load_state_dict(ck["best_state"] if ck.get("best_state") else ck["model"])
        return model.eval()
    return load_resnet56(path)  # the shipped .th, or a file decompose wrote


def correct(model: torch.nn.Module, loader) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for x, y in loader:
            out.append(model(x).argmax(1) == y)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("first")
    ap.add_argument("second")
    args = ap.parse_args()
    loader = make_loader(TEST, batch_size=500)
    print(describe(paired(correct(load(args.first), loader), correct(load(args.second), loader))))


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-image correctness of two models on the same images -> top-1s, gap (second minus
    first, points), its paired standard error and the exact McNemar p."""
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    gap = (only_b - only_a) / n  # second minus first, as a fraction
    se = math.sqrt(max(only_a + only_b - n * gap * gap, 0.0)) / n
    k, m = min(only_a, only_b), only_a + only_b
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"images": n, "first": float(a.float().mean()), "second": float(b.float().mean()),
            "gap_points": round(100 * gap, 2), "se_points": round(100 * se, 2),
            "only_first": only_a, "only_second": only_b, "mcnemar_p": round(p, 4)}


def describe(r: dict) -> str:
    return (f"{r['images']} images: first {r['first']:.2%}, second {r['second']:.2%}; "
            f"second - first = {r['gap_points']:.2f} points, paired standard error "
            f"{r['se_points']:.2f} points (discordant: {r['only_first']} only first, "
            f"{r['only_second']} only second); McNemar p = {r['mcnemar_p']:.3f}")

if __name__ == "__main__":
    main()
