"""ResNet-56 on a CUDA GPU, PyTorch eager: the decoupled forms against the original.

The GPU counterpart of ``speed_resnet56.py`` (docs/layouts.md, "GPUs"). Every 3x3 conv but the
stem is decoupled at T = 1, 2, 3 in the ``plain`` form (channel-multiplier depthwise, then 1x1)
and the ``dw1`` form (T parallel multiplier-1 depthwise convs as one grouped conv), in NCHW and
channels_last. Timing: CUDA events around ``--iters`` forward passes under ``inference_mode``,
all models of one layout and batch in rotating order per round, ``--rounds`` rounds; the table
gives each model's median ms per pass and the median of its per-round ratios to the original.

    python experiments/gpu_forms.py --batches 64,256 --out /tmp/gpu_forms.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from _paths import RESNET56, load_resnet56

import decompose
from decompose.engine.layout import to_channels_last_


def models(original: torch.nn.Module, channels_last: bool) -> dict[str, torch.nn.Module]:
    out = {"original": copy.deepcopy(original)}
    for t in (1, 2, 3):
        for form in ("plain", "dw1"):
            if t == 1 and form == "dw1":
                continue  # the same modules as plain at T = 1
            m = copy.deepcopy(original)
            decompose.decompose_(m, rank=t, form=form, exclude=("conv1",),
                                 input_shape=(3, 32, 32))
            out[f"T={t} {form}"] = m
    for m in out.values():
        m.eval()
        if channels_last:
            to_channels_last_(m)
    return out


def time_all(nets: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, iters: int
             ) -> dict[str, dict[str, float]]:
    names = list(nets)
    ms: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up: cuDNN picks its algorithms here
            for _ in range(5):
                nets[n](x)
        torch.cuda.synchronize()
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(iters):
                    nets[n](x)
                b.record()
                b.synchronize()
                ms[n].append(a.elapsed_time(b) / iters)
    base = ms["original"]
    return {n: {"ms": round(statistics.median(v), 3),
                "speedup": round(statistics.median(o / t for o, t in zip(base, v)), 2)}
            for n, v in ms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path,
                    default=RESNET56)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu_forms.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for GPUs (speed_resnet56.py is the "
                         "CPU one)")
    torch.backends.cudnn.benchmark = True
    original = load_resnet56(args.model)
    rows = []
    for cl in (False, True):
        nets = {k: v.cuda() for k, v in models(original, cl).items()}
        for b in (int(s) for s in args.batches.split(",")):
            x = torch.randn(b, 3, 32, 32, device="cuda")
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            for name, r in time_all(nets, x, args.rounds, args.iters).items():
                rows.append({"layout": "channels_last" if cl else "nchw", "batch": b,
                             "model": name, **r})
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "rounds": args.rounds,
            "iters": args.iters, "cudnn_benchmark": True}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"{meta['device']}, torch {meta['torch']}, cuDNN {meta['cudnn']}, eager, "
          "inference_mode, cudnn.benchmark on\n")
    print("| layout | batch | model | ms per pass | speed-up vs original |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['batch']} | {r['model']} | {r['ms']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
