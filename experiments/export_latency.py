"""onnxruntime latency of the shipped CIFAR ResNet-20/56, original vs decoupled at rank 1 and 2.

Every model is exported with decompose.io.export.export_onnx (torch.onnx.export(dynamo=False),
opset 17, dynamic batch, checked in onnxruntime against PyTorch), then all the sessions of one
depth are timed side by side by decompose.io.export.onnx_latency: one CPU session each with THREADS
intra-op threads and one inter-op thread, alternating rounds, median. Order "auto", every 3x3
conv decoupled (the CLI's defaults), data-free. "T=2 dw1" is T=2 with decompose.methods.nd.forms's "dw1" form
(the same function; each depthwise conv rewritten with channel multiplier 1).

The same numbers for one pair come from the CLI:
    decompose resnet20.th --arch decompose.models.cifar_resnet:resnet20 --rank 1 -o r20-t1.pt
    decompose export r20-t1.pt --onnx r20-t1.onnx --batch-size 64 --compare resnet20.th \
        --arch decompose.models.cifar_resnet:resnet20

    python experiments/export_latency.py --threads 1  # both depths, batch 1 and 64, both clocks
    python experiments/export_latency.py --threads 2  # wall clock only
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

import decompose
from decompose.io.export import export_onnx, onnx_latency
from decompose.measure.clock import CLOCKS, speedups

# ----------------------------------------------------------------------------- settings
DEPTHS = (20, 56)
RANKS = (1, 2)
BATCHES = (1, 64)
REPEATS = {1: 60, 64: 20}
# wall clock, and (with --threads 1) CPU time of the calling thread, which onnxruntime runs the
# whole graph on when it has one intra-op thread: on a shared, overloaded machine the wall-clock
# median mostly measures how often a run is preempted (longer runs more often), the CPU time not.


def dw1_form(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every decoupled layer in decompose.methods.nd.forms's "dw1" form."""
    from decompose.engine.surgery import replace_module
    from decompose.methods.nd.forms import fast_form
    from decompose.methods.nd.layers import is_decoupled
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if is_decoupled(mod):
            replace_module(m, name, fast_form(mod, "dw1"))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, action="append", help="20 and/or 56 (default both)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="onnxruntime intra-op threads (default: torch's count)")
    args = ap.parse_args()
    import onnxruntime
    from bn_folding import load_pretrained
    print(json.dumps({"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                      "threads": args.threads}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depth or DEPTHS:
            base = load_pretrained(depth)
            models = {"original": base}
            for rank in RANKS:
                m = copy.deepcopy(base)
                decompose.decompose_(m, rank=rank)
                models[f"T={rank}"] = m
                if rank > 1:  # the same function, depthwise convs rewritten with multiplier 1
                    models[f"T={rank} dw1"] = dw1_form(m)
            files = {}
            for name, m in models.items():
                res = export_onnx(m, Path(tmp) / f"r{depth}-{name}.onnx", (3, 32, 32))
                files[name] = res.path
                print(json.dumps({"depth": depth, "model": name, "onnx_max_rel_err":
                                  res.max_rel_err}), flush=True)
            for batch in BATCHES:
                for clock in CLOCKS if args.threads == 1 else ("wall",):
                    lat = onnx_latency(files, (3, 32, 32), batch_size=batch,
                                       threads=args.threads, repeats=REPEATS[batch], warmup=5,
                                       timer=CLOCKS[clock])
                    up = speedups(lat, "original")
                    for name, r in lat.items():
                        print(json.dumps({"depth": depth, "batch": batch, "model": name,
                                          "clock": clock, "median_ms": round(r.median_ms, 3),
                                          "min_ms": round(r.min_ms, 3),
                                          "q1_ms": round(r.q1_ms, 3), "q3_ms": round(r.q3_ms, 3),
                                          "speedup": round(up[name], 2), "threads": r.threads,
                                          "rounds": len(r.samples_ms)}), flush=True)


if __name__ == "__main__":
    main()
