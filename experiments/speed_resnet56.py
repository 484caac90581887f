"""ResNet-56 (CIFAR) on CPU eager: is the decomposed model faster on the clock, and by how much
relative to its multiply-add reduction? (issue 5; docs/speed.md has the results.)

Every 3x3 conv except the stem (conv1) is decoupled at T = 1, 2, 3 with form plain / dw1 / auto,
and with the latency-aware planner (``form="fastest", latency_aware=True``: times each layer's
forms against the original at this batch and keeps the original unless 1.05x faster). In NCHW and
channels_last (model and input converted once):

* whole model: all variants of one layout timed side by side by ``compare_latency`` (warm-up,
  interleaved rounds in rotating order, median of per-round paired ratios to the original);
* MACs: decomposed layers' original / decomposed multiply-adds (the report's totals);
* per layer: each decoupled layer against its original conv on the input it receives
  (layers of the same geometry and option timed once); "slower" counts layers whose decoupled
  form is slower than the original (speed-up < 1).

    python experiments/speed_resnet56.py --threads 1 --batch 64
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from _paths import load_resnet56

import decompose
from decompose.measure.clock import compare_latency, speedups
from decompose.measure.compare import capture_inputs
from decompose.methods.nd.forms import form_name


def variants():
    for t in (1, 2, 3):
        for form in ("plain", "dw1", "auto"):
            if t == 1 and form == "dw1":
                continue  # dw1 is plain at T = 1
            yield f"T{t} {form}", dict(rank=t, form=form)
        yield f"T{t} latency-aware", dict(rank=t, form="fastest", latency_aware=True)


def per_layer(original, model, report, x, repeats, threads):
    """Speed-up of every decoupled layer over its original conv (shared by geometry/option)."""
    names = [lp.name for lp in report.decomposed]
    if not names:
        return []
    inputs = capture_inputs(original, names, x)
    cache, out = {}, []
    for lp in report.decomposed:
        conv, dec = original.get_submodule(lp.name), model.get_submodule(lp.name)
        xi = inputs[lp.name]
        key = (tuple(conv.weight.shape), conv.stride, tuple(xi.shape), lp.order, lp.rank,
               form_name(dec))
        if key not in cache:
            res = compare_latency({"orig": conv, "dec": dec}, xi, repeats=repeats, warmup=2,
                                  threads=threads, number=3)
            cache[key] = speedups(res, "orig")["dec"]
        out.append(cache[key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layer-repeats", type=int, default=9)
    ap.add_argument("--layouts", default="nchw,channels_last")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base = load_resnet56()
    x0 = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = []
    for layout in args.layouts.split(","):
        cl = layout == "channels_last"
        fmt = torch.channels_last if cl else torch.contiguous_format
        original = copy.deepcopy(base).to(memory_format=fmt)
        x = x0.contiguous(memory_format=fmt)
        models, reports = {"original": original}, {}
        for name, kw in variants():
            m = copy.deepcopy(original)
            rep = decompose.decompose_(m, exclude=("conv1",), input_shape=(3, 32, 32),
                                       latency_batch=args.batch, threads=args.threads, **kw)
            m.to(memory_format=fmt)
            models[name], reports[name] = m, rep
        with torch.inference_mode():
            ref = original(x)
            for name, m in models.items():  # sanity: every model runs and gives finite logits
                assert torch.isfinite(m(x)).all() and m(x).shape == ref.shape, name
        res = compare_latency(models, x, repeats=args.repeats, warmup=2, threads=args.threads)
        sp = speedups(res, "original")
        for name, rep in reports.items():
            tot = rep.totals
            layer_sp = per_layer(original, models[name], rep, x, args.layer_repeats, args.threads)
            mac_red = (tot["decomposed_macs_before"] / tot["decomposed_macs_after"]
                       if tot["decomposed_macs_after"] else 1.0)
            whole_mac_red = tot["macs_before"] / tot["macs_after"]
            forms = sorted({lp.form or "plain" for lp in rep.decomposed})
            rows.append(dict(
                layout=layout, variant=name, decomposed=tot["layers_decomposed"],
                forms="/".join(forms) or "-", ms=res[name].median_ms,
                orig_ms=res["original"].median_ms, speedup=sp[name], mac_red=mac_red,
                whole_mac_red=whole_mac_red, ratio=sp[name] / whole_mac_red,
                layer_min=min(layer_sp) if layer_sp else None,
                slower=sum(s < 1.0 for s in layer_sp)))
            r = rows[-1]
            print(f"{layout:13s} {name:17s} dec={r['decomposed']:2d} {r['forms']:9s} "
                  f"{r['ms']:8.1f} ms (orig {r['orig_ms']:.1f}) x{r['speedup']:.2f} "
                  f"MACs/{r['mac_red']:.2f} (model /{r['whole_mac_red']:.2f}) "
                  f"ratio {r['ratio']:.2f} slower layers {r['slower']}", flush=True)
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"{platform.machine()}, {args.repeats} interleaved rounds (whole model), "
          f"{args.layer_repeats} (per layer), {time.perf_counter() - t_start:.0f} s\n")
    print("| layout | variant | layers decoupled | forms | ms | speed-up | MACs reduction "
          "(decoupled layers) | MACs reduction (model) | speed-up / model MACs reduction | "
          "min layer speed-up | layers slower |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lm = f"{r['layer_min']:.2f}" if r["layer_min"] is not None else "-"
        print(f"| {r['layout']} | {r['variant']} | {r['decomposed']} | {r['forms']} | "
              f"{r['ms']:.0f} (orig {r['orig_ms']:.0f}) | {r['speedup']:.2f}x | "
              f"{r['mac_red']:.2f}x | {r['whole_mac_red']:.2f}x | {r['ratio']:.2f} | {lm} | "
              f"{r['slower']} |")


if __name__ == "__main__":
    main()
