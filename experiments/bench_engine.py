"""How fast is the engine itself? Decompose the 13 convolutions of VGG16 (random weights,
input 3x224x224) at rank 1 and report wall time and peak memory against the weights' size.

    python experiments/bench_engine.py            # rank 1, order auto
    python experiments/bench_engine.py --rank 2 --order dw-pw

Peak memory is the growth of the process's peak resident set (VmHWM, reset just before the run)
over the resident set after the model was built; the target is under 3x the weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import decompose

# VGG16's conv widths ("M" = 2x2 max-pool), as in Simonyan & Zisserman 2015, configuration D
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--order", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    times, peaks = [], []
    for _ in range(args.repeats):
        model = vgg16_features().eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rss = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        t0 = time.perf_counter()
        rep = decompose.decompose_(model, rank=args.rank, order=args.order, input_shape=(3, 224, 224))
        times.append(time.perf_counter() - t0)
        peaks.append(max(_status("VmHWM") - rss, 0))
        del model
    t = rep.totals
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"VGG16 convs: {t['layers_decomposed']} decoupled at rank {args.rank} ({args.order}); "
          f"weights {weights / 2**20:.1f} MiB")
    print(f"MACs {t['macs_before'] / 1e9:.2f} G -> {t['macs_after'] / 1e9:.2f} G")
    print(f"wall time: best {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s "
          f"over {args.repeats} runs (target <= 10 s)")
    print(f"peak memory growth: {max(peaks) / 2**20:.1f} MiB = {max(peaks) / weights:.2f}x the "
          "weights (target < 3x)")


if __name__ == "__main__":
    main()
