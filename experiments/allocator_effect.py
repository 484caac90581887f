"""How much of ResNet-56's rank-1 speed-up depends on glibc's malloc? (docs/speed.md)

At batch 64 a 16-channel 32x32 activation is 4 MB. glibc serves blocks that large with mmap
and returns them on free unless its (dynamic) mmap threshold has been raised, so a fresh
process can page-fault on every such tensor, and the rank-1 model, which makes twice as many
activations per layer, pays more for it. Setting ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` keeps those blocks in the heap (so does an allocator such as jemalloc
or tcmalloc, or an earlier larger batch in the same process, which raises glibc's dynamic
threshold).

Each run is a fresh Python process that times, side by side in one ``compare_latency`` (3
warm-up calls, 15 interleaved rounds), the shipped ResNet-56 NCHW and channels_last and the
rank-1 model (every 3x3 conv but the stem) NCHW and channels_last, then counts each one's
minor page faults per forward pass (``getrusage``); runs alternate between the default
allocator settings and the raised thresholds.

    python experiments/allocator_effect.py --runs 3 --threads 1 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _paths import RESNET56

TUNED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}

CHILD = r"""
import copy, json, resource, sys, torch
import decompose
from decompose.engine.layout import to_channels_last_
from decompose.io.files import load_model
from decompose.measure.clock import compare_latency, speedups
threads, batch, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(threads)
o = load_model(model, arch="decompose.models.cifar_resnet:resnet56").model.eval()
t = copy.deepcopy(o)
decompose.decompose_(t, rank=1, exclude=("conv1",), input_shape=(3, 32, 32))
ocl, tcl = copy.deepcopy(o), copy.deepcopy(t)
to_channels_last_(ocl)
to_channels_last_(tcl)
x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
nets = {"original": o, "original channels_last": ocl, "T=1": t, "T=1 channels_last": tcl}
r = compare_latency(nets, x, repeats=15, warmup=3, threads=threads)
s, s_cl = speedups(r, "original"), speedups(r, "original channels_last")
faults = {}
with torch.inference_mode():
    for k, m in nets.items():  # minor page faults per forward pass, after the timing
        a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            m(x)
        faults[k] = round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a) / 5)
print(json.dumps({k: {"ms": round(v.median_ms, 1), "vs_original": round(s[k], 2),
                      "vs_original_cl": round(s_cl[k], 2), "page_faults": faults[k]}
                  for k, v in r.items()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("/tmp/allocator_effect.json"))
    args = ap.parse_args()
    rows = []
    for i in range(args.runs):
        for setting in ("default", "raised thresholds"):
            env = {k: v for k, v in os.environ.items() if k not in TUNED}
            if setting != "default":
                env.update(TUNED)
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), str(args.batch),
                                  str(RESNET56)], env=env, capture_output=True, text=True,
                                 check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            rows.append({"run": i + 1, "malloc": setting, **res})
            print(f"run {i + 1}, {setting}: " + "; ".join(
                f"{k} {v['ms']} ms ({v['vs_original']}x / {v['vs_original_cl']}x, "
                f"{v['page_faults']} page faults per pass)"
                for k, v in res.items()), flush=True)
    args.out.write_text(json.dumps({"rows": rows, "threads": args.threads,
                                    "batch": args.batch, "tuned_env": TUNED}, indent=1))
    print(f"\nms (speed-up vs original NCHW / vs original channels_last); wrote {args.out}")


if __name__ == "__main__":
    main()
