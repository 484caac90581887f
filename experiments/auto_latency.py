"""`--method auto --target-latency 0.7` on ResNet-56: calibrated, fine-tuned, and on the clock.

The measurement behind the latency-budget rows of docs/results-methods.md. Three steps; the first
two write files under out/ and /tmp, the last adds its timings to
experiments/results/auto_latency_resnet56.json (which the second step's result seeds):

    decompose ../shared/models/cifar-resnet/resnet56.th \\
        --arch decompose.models.cifar_resnet:resnet56 --method auto --target-latency 0.7 \\
        --plan-batch 64 --plan-threads 1 --channels-last --exclude conv1 \\
        --calibrate ../shared/data/cifar10/train --data ../shared/data/cifar10/test \\
        --threads 1 -o out/r56-auto-lat07.pt --json > out/r56-auto-lat07.json
    python experiments/finetune_resnet.py --decomposed out/r56-auto-lat07.pt \\
        --train-images 50000 --test-images 10000 --epochs 2 --threads 1 --no-control \\
        --budget-minutes 120 --workdir /tmp/ft-lat07
    python experiments/auto_latency.py          # on a quiet machine: times the planned model

The planner now checks its plan on the whole model (docs/speed.md); the same CLI command with
`-o out/r56-auto-lat07-v.pt --json > out/r56-auto-lat07-v.json`, then

    python experiments/auto_latency.py --model out/r56-auto-lat07-v.pt --key checked \
        --report out/r56-auto-lat07-v.json

The planner times every option of every method on this machine (batch 64, 1 thread,
channels_last) and keeps the plan whose predicted whole-model time is 0.7 of the original's.
This script checks that prediction with the whole model: the planned file against the original
in NCHW and laid out channels_last, batch 1 and 64, one thread, median of interleaved rounds.
The fine-tuned model has the same layers, so the same clock.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from pathlib import Path

import torch
from _paths import load_resnet56

from decompose.engine.layout import to_channels_last_
from decompose.io.files import load_model
from decompose.measure.clock import allocator_settings, compare_latency

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "experiments" / "results" / "auto_latency_resnet56.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "out" / "r56-auto-lat07.pt"))
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--key", default="speed",
                    help="where the timings go in the JSON: 'speed' (the fine-tuned plan) or "
                         "'checked' (a plan made with the whole-model check, whose --json report "
                         "--report names)")
    ap.add_argument("--report", default=None, help="the CLI's --json report of --model")
    args = ap.parse_args()
    torch.set_num_threads(1)
    original = load_resnet56().eval()
    original_cl = copy.deepcopy(original)
    to_channels_last_(original_cl)
    planned = load_model(args.model).model.eval()  # saved channels_last, as planned
    data = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    g = torch.Generator().manual_seed(0)
    speed = {}
    for batch in (1, 64):
        x = torch.randn(batch, 3, 32, 32, generator=g)
        res = compare_latency({"original": original, "original_cl": original_cl,
                               "planned": planned}, x, repeats=args.repeats, warmup=3,
                              threads=1)
        ms = {k: v.median_ms for k, v in res.items()}
        speed[f"b{batch}"] = {**{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                              "fraction_of_original_cl": ms["planned"] / ms["original_cl"],
                              "fraction_of_original": ms["planned"] / ms["original"]}
        print(f"batch {batch}: original {ms['original']:.2f} ms, channels_last "
              f"{ms['original_cl']:.2f} ms, planned {ms['planned']:.2f} ms = "
              f"{ms['planned'] / ms['original_cl']:.3f} of the original laid out channels_last, "
              f"{ms['planned'] / ms['original']:.3f} of it in NCHW", flush=True)
    entry = {**speed, "threads": 1, "repeats": args.repeats,
             "allocator": allocator_settings(), "input": "random N(0,1), NCHW"}
    if args.report:
        rep = json.loads(Path(args.report).read_text())
        entry.update({k: rep[k] for k in ("totals", "accuracy", "latency_plan")},
                     methods=dict(Counter(lp["method"] for lp in rep["layers"]
                                          if not lp.get("skipped"))))
    data[args.key] = entry
    RESULT.write_text(json.dumps(data, indent=1))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
