"""Fine-tuned ResNet-56 files on this CPU: top-1 on all test JPEGs and clock speed, side by side.

The CPU half of the long fine-tune (``long_finetune.py`` writes the files, on a GPU when one is
lent). Every file is scored on the 10,000 CIFAR-10 test JPEGs; decoupled models are timed laid
out channels_last (their fast layout, docs/layouts.md), dense ones both as loaded (NCHW) and
channels_last, all in one ``compare_latency`` (warm-up, interleaved rounds, median of per-round
paired ratios). ``--pair A:B`` prints the paired per-image comparison of two models
(``paired_gap.py``: gap, paired standard error, McNemar p).

    python experiments/finetuned_points.py --threads 1 --batch 64 \\
        --model control=/tmp/gpu1/resnet56_control.finetuned.pt \\
        --model t1=/tmp/gpu1/resnet56_t1.finetuned.pt --pair shipped:t1 --pair control:t1

The shipped original is always included as ``shipped``. Scoring runs first, in batches of 500,
which raises glibc's dynamic mmap threshold before the timing: the times are those of a warm
process (``allocator_effect.py`` and docs/speed.md, "The memory allocator").
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from _paths import RESNET56, TEST
from paired_gap import correct, describe, load, paired

from decompose.data import make_loader
from decompose.engine.layout import to_channels_last_
from decompose.measure.clock import allocator_settings, compare_latency, speedups


def decoupled(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--pair", action="append", default=[], metavar="A:B")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("/tmp/finetuned_points.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = {"shipped": load(str(RESNET56))}
    for spec in args.model:
        name, _, path = spec.partition("=")
        models[name] = load(path)
    loader = make_loader(TEST, batch_size=500)
    hits = {name: correct(m, loader) for name, m in models.items()}
    timed = {}
    for name, m in models.items():
        if not decoupled(m):
            timed[name] = m
            m = copy.deepcopy(m)
        to_channels_last_(m)
        timed[f"{name} channels_last"] = m
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = compare_latency(timed, x, repeats=args.repeats, warmup=2, threads=args.threads)
    vs, vs_cl = speedups(res, "shipped"), speedups(res, "shipped channels_last")
    print(f"batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.machine()}; top-1 on {len(hits['shipped'])} test JPEGs\n")
    print("| model | top-1 | timed as | ms (quartiles) | speed-up vs shipped (NCHW) | "
          "vs shipped channels_last |\n|---|---|---|---|---|---|")
    rows = []
    for key, r in res.items():
        name = key.removesuffix(" channels_last")
        row = {"model": name, "layout": "channels_last" if key != name else "nchw",
               "top1": float(hits[name].float().mean()), "ms": round(r.median_ms, 1),
               "q1_ms": round(r.q1_ms, 1), "q3_ms": round(r.q3_ms, 1),
               "speedup_vs_shipped": round(vs[key], 2),
               "speedup_vs_shipped_cl": round(vs_cl[key], 2)}
        rows.append(row)
        print(f"| {name} | {row['top1']:.2%} | {row['layout']} | {row['ms']} "
              f"({row['q1_ms']}-{row['q3_ms']}) | "
              f"{row['speedup_vs_shipped']}x | {row['speedup_vs_shipped_cl']}x |")
    pairs = {}
    for spec in args.pair:
        a, _, b = spec.partition(":")
        pairs[spec] = paired(hits[a], hits[b])
        print(f"\n{b} - {a}: {describe(pairs[spec])}")
    args.out.write_text(json.dumps({"rows": rows, "pairs": pairs, "batch": args.batch,
                                    "threads": args.threads, "torch": torch.__version__,
                                    "allocator": allocator_settings(),
                                    "models": dict(m.partition("=")[::2] for m in args.model),
                                    "minutes": round((time.perf_counter() - t0) / 60, 1)},
                                   indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
