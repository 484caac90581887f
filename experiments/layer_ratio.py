"""Issue 5 target (b) measured on the decomposed layers alone: their time saved vs their MACs cut.

ResNet-56 with every 3x3 conv but the stem decoupled at T = 1. Each distinct layer geometry
(channels, stride, input shape) is timed once, original conv against its decoupled pair, on
the input that layer receives in the original network at batch ``--batch``, in three runtimes:
PyTorch eager NCHW, PyTorch eager channels_last (model and input converted), and onnxruntime
(each module exported alone by ``decompose.io.export.export_onnx``; one intra-op thread). Each
pair is timed side by side (``compare_latency`` / ``onnx_latency``: warm-up, interleaved
rounds, medians); the totals weight each geometry by how many layers share it.

    python experiments/layer_ratio.py --threads 1 --batch 64

Ratio = (decomposed layers' time speed-up) / (their multiply-add reduction); the target is
>= 0.6.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from _paths import load_resnet56

import decompose
from decompose.engine.layout import to_channels_last_
from decompose.engine.trace import count_macs
from decompose.io.export import export_onnx, onnx_latency
from decompose.measure.clock import compare_latency
from decompose.measure.compare import capture_inputs

RUNTIMES = ("eager NCHW", "eager channels_last", "onnxruntime")


def time_pair(orig: torch.nn.Module, dec: torch.nn.Module, x: torch.Tensor, repeats: int,
              threads: int, tmp: Path) -> dict[str, tuple[float, float]]:
    """runtime -> (original ms, decoupled ms), each pair timed side by side."""
    out = {}
    r = compare_latency({"o": orig, "d": dec}, x, repeats=repeats, warmup=10, threads=threads)
    out["eager NCHW"] = (r["o"].median_ms, r["d"].median_ms)
    o_cl, d_cl = copy.deepcopy(orig), copy.deepcopy(dec)
    to_channels_last_(o_cl)
    to_channels_last_(d_cl)
    r = compare_latency({"o": o_cl, "d": d_cl}, x.contiguous(memory_format=torch.channels_last),
                        repeats=repeats, warmup=10, threads=threads)
    out["eager channels_last"] = (r["o"].median_ms, r["d"].median_ms)
    shape, paths = tuple(x.shape[1:]), {}
    for name, m in (("o", orig), ("d", dec)):
        paths[name] = tmp / f"{name}.onnx"
        export_onnx(m, paths[name], input_shape=shape, batch_size=len(x), force=True)
    r = onnx_latency(paths, shape, batch_size=len(x), threads=threads, repeats=repeats,
                     warmup=10)
    out["onnxruntime"] = (r["o"].median_ms, r["d"].median_ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--out", type=Path, default=Path("/tmp/layer_ratio.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    original = load_resnet56()
    model = copy.deepcopy(original)
    rep = decompose.decompose_(model, rank=1, exclude=("conv1",), input_shape=(3, 32, 32))
    names = [lp.name for lp in rep.decomposed]
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = capture_inputs(original, names, x)
    groups: dict[tuple, list[str]] = {}
    for n in names:
        c = original.get_submodule(n)
        groups.setdefault((c.in_channels, c.out_channels, c.stride, tuple(inputs[n].shape)),
                          []).append(n)
    rows, tot = [], {k: [0.0, 0.0] for k in RUNTIMES}
    macs = [0, 0]
    with tempfile.TemporaryDirectory() as tmp:
        for (cin, cout, stride, shape), members in groups.items():
            n, k = members[0], len(members)
            orig, dec = original.get_submodule(n), model.get_submodule(n)
            m_o, m_d = count_macs(orig, shape[1:]), count_macs(dec, shape[1:])
            t = time_pair(orig, dec, inputs[n], args.repeats, args.threads, Path(tmp))
            macs[0] += k * m_o
            macs[1] += k * m_d
            for rt, (a, b) in t.items():
                tot[rt][0] += k * a
                tot[rt][1] += k * b
            rows.append({"geometry": f"{cin}->{cout}, stride {stride[0]}, input "
                                     f"{'x'.join(map(str, shape[1:]))}", "layers": k,
                         "macs_reduction": round(m_o / m_d, 2),
                         **{rt: {"ms": [round(a, 3), round(b, 3)],
                                 "speedup": round(a / b, 2)} for rt, (a, b) in t.items()}})
    red = macs[0] / macs[1]
    summary = {rt: {"ms": [round(a, 1), round(b, 1)], "speedup": round(a / b, 2),
                    "ratio": round(a / b / red, 2)} for rt, (a, b) in tot.items()}
    print(f"ResNet-56, T = 1, batch {args.batch}, {args.threads} thread(s), torch "
          f"{torch.__version__}\n")
    print("| geometry | layers | MACs reduction | " + " | ".join(
        f"{rt} speed-up (ratio)" for rt in RUNTIMES) + " |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['geometry']} | {r['layers']} | {r['macs_reduction']}x | " + " | ".join(
            f"{r[rt]['speedup']}x ({r[rt]['speedup'] / r['macs_reduction']:.2f})"
            for rt in RUNTIMES) + " |")
    print(f"| **all {len(names)} decomposed layers** | {len(names)} | {red:.2f}x | " + " | ".join(
        f"**{summary[rt]['speedup']}x ({summary[rt]['ratio']})**" for rt in RUNTIMES) + " |")
    args.out.write_text(json.dumps({"rows": rows, "summary": summary, "macs_reduction": red,
                                    "batch": args.batch, "threads": args.threads,
                                    "torch": torch.__version__}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
