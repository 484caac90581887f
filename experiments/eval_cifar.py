"""Full CIFAR-10 test-set accuracy of the shipped pretrained ResNets, on the JPEG copy in ../shared.

Expected (../shared/models/cifar-resnet/README.md): ResNet-20 81.0% top-1, ResNet-56 83.2%.

    python experiments/eval_cifar.py --depth 20
    python experiments/eval_cifar.py --depth 56 --limit 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from decompose.data import make_loader
from decompose.io.files import load_model
from decompose.measure.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
DATA = SHARED / "data" / "cifar10" / "test"
MODELS = SHARED / "models" / "cifar-resnet"


def load_pretrained(depth: int) -> torch.nn.Module:
    """resnet{depth} with the shipped weights, through the safe loader the CLI uses."""
    path = MODELS / f"resnet{depth}.th"
    return load_model(path, arch=f"decompose.models.cifar_resnet:resnet{depth}").model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=20, help="20 or 56 (the shipped checkpoints)")
    ap.add_argument("--limit", type=int, default=None, help="seeded subset size; default all")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    model = load_pretrained(args.depth)
    t0 = time.perf_counter()
    loader = make_loader(DATA, batch_size=args.batch_size, limit=args.limit)
    res = evaluate(model, loader)
    out = res.to_dict() | {"depth": args.depth, "threads": torch.get_num_threads(),
                           "total_seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
