"""ResNet-56: accuracy and clock speed of the same decomposed models (issue 5, targets a-c).

Each setting is decoupled (every 3x3 conv but the stem), calibrated without labels on 512
training images (``decompose.calibrate_``), scored on the CIFAR-10 test JPEGs, and timed:

* whole model, batch 64, against the original as loaded (NCHW) **and** the original laid out
  channels_last, all settings and both originals side by side in one ``compare_latency`` (warm-up,
  interleaved rounds, median of per-round paired ratios);
* per layer: each decoupled layer against its original conv, in the model's layout, on the input
  it receives in the original network (``decompose.measure.compare.measure_latency``): "slower" counts
  layers with a speed-up below 1 (target c).

The settings: T = 1 everywhere; the MACs budget of the calibration work (``target_macs=0.5``);
the latency-aware planner at T = 1; latency budgets (``target_latency``) planned at batch 64 on
this machine; each in NCHW and channels_last (``channels_last=True``: weights laid out
channels_last before planning, so the planner times in that layout and its budget is a fraction
of the *channels_last* original).

    python experiments/operating_points.py --threads 1 --batch 64 --test-images 10000

Writes one JSON line per setting to --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
from _paths import TEST, TRAIN, load_resnet56

import decompose
from decompose.data import calibration_batches, make_loader
from decompose.engine.layout import to_channels_last_
from decompose.measure.clock import allocator_settings, compare_latency, speedups
from decompose.measure.compare import cache_batches, evaluate_model, measure_latency


def settings(batch: int, threads: int, latency_targets: dict[bool, list[float]]):
    timed = dict(latency_batch=batch, threads=threads)
    for cl in (False, True):
        lay = "channels_last" if cl else "nchw"
        yield f"{lay} T=1", dict(rank=1, channels_last=cl)
        yield f"{lay} T=1 latency-aware", dict(rank=1, form="fastest", latency_aware=True,
                                               channels_last=cl, **timed)
        yield f"{lay} MACs 0.5 latency-aware", dict(target_macs=0.5, form="fastest",
                                                    latency_aware=True, channels_last=cl, **timed)
        for f in latency_targets[cl]:
            yield f"{lay} latency {f:g}", dict(target_latency=f, form="fastest",
                                               channels_last=cl, **timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--latency-targets", default="0.9,0.8",
                    help="NCHW settings' latency budgets (fractions of the NCHW original)")
    ap.add_argument("--latency-targets-cl", default="0.9,0.85,0.8,0.7",
                    help="channels_last settings' budgets (fractions of the channels_last "
                         "original)")
    ap.add_argument("--repeats", type=int, default=9, help="whole-model interleaved rounds")
    ap.add_argument("--layer-repeats", type=int, default=9)
    ap.add_argument("--only", default="", help="comma-separated substrings of setting names")
    ap.add_argument("--out", default="/tmp/operating_points.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {msg}", flush=True)

    original = load_resnet56()
    original_cl = copy.deepcopy(original)
    to_channels_last_(original_cl)
    test = cache_batches(make_loader(TEST, batch_size=256, limit=args.test_images, seed=0),
                         quiet=True)
    calib = [x for x in calibration_batches(TRAIN, n_samples=args.calib_images)]
    before = evaluate_model(original, test, quiet=True)
    say(f"original: top-1 {before['top1']:.2%} on {before['images']} test images")
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    targets = {cl: [float(v) for v in text.split(",") if v]
               for cl, text in ((False, args.latency_targets), (True, args.latency_targets_cl))}
    rows, models = [], {}
    for name, kw in settings(args.batch, args.threads, targets):
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        model = copy.deepcopy(original)
        t = time.perf_counter()
        try:
            report = decompose.decompose_(model, exclude=("conv1",), input_shape=(3, 32, 32),
                                          **kw)
        except decompose.DecomposeError as e:
            say(f"{name}: {e}")
            rows.append({"setting": name, "config": kw, "error": str(e)})
            continue
        plan_s = time.perf_counter() - t
        row = {"setting": name, "config": kw, "plan_seconds": round(plan_s, 1),
               "layers_decomposed": report.totals["layers_decomposed"],
               "macs_ratio_decomposed": report.totals.get("decomposed_macs_ratio"),
               "macs_before": report.totals["macs_before"],
               "macs_after": report.totals["macs_after"],
               "forms": sorted({lp.form or "plain" for lp in report.decomposed}),
               "ranks": sorted({lp.rank for lp in report.decomposed}),
               "predicted_fraction": (report.latency_plan or {}).get("predicted_fraction")}
        if report.decomposed:
            datafree = evaluate_model(model, test, quiet=True)["top1"]
            decompose.api.plain_forms_(model)
            cal = decompose.calibrate_(model, original, calib, samples=args.calib_images,
                                       progress=False)
            decompose.api.finalize_forms_(model, report)
            after = evaluate_model(model, test, quiet=True)
            same = original_cl if kw.get("channels_last") else original
            measure_latency(same, model, report.layers, x, repeats=args.layer_repeats,
                            threads=args.threads, quiet=True)  # fills lp.latency_* per layer
            sp = [lp.latency_speedup for lp in report.decomposed
                  if lp.latency_speedup is not None]
            row.update(top1_datafree=datafree, top1=after["top1"],
                       drop=round(100 * (before["top1"] - after["top1"]), 2),
                       calib_seconds=round(cal.seconds, 1),
                       layers_slower=sum(s < 1 for s in sp),
                       min_layer_speedup=round(min(sp), 2) if sp else None)
            models[name] = model
        else:
            row.update(top1=before["top1"], drop=0.0, layers_slower=0)
            models[name] = model
        rows.append(row)
        say(f"{name}: {row.get('layers_decomposed')} layers, top-1 {row['top1']:.2%} "
            f"(drop {row['drop']:.2f}), {row.get('layers_slower')} layers slower")

    say("timing every model side by side")
    res = compare_latency({"original": original, "original channels_last": original_cl,
                           **models}, x, repeats=args.repeats, warmup=2, threads=args.threads)
    vs_nchw = speedups(res, "original")
    vs_cl = speedups(res, "original channels_last")
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    for row in rows:
        n = row["setting"]
        row.update(ms=round(res[n].median_ms, 1), speedup_vs_original=round(vs_nchw[n], 2),
                   speedup_vs_original_cl=round(vs_cl[n], 2))
        red = row["macs_before"] / row["macs_after"]
        row["speedup_over_macs_reduction"] = round(vs_nchw[n] / red, 2) if red > 1 else None
    meta = {"original_ms": round(res["original"].median_ms, 1),
            "original_cl_ms": round(res["original channels_last"].median_ms, 1),
            "original_cl_speedup": round(vs_nchw["original channels_last"], 2),
            "original_top1": before["top1"], "test_images": before["images"],
            "batch": args.batch, "threads": args.threads, "torch": torch.__version__,
            "allocator": allocator_settings(),
            "machine": platform.machine(), "minutes": round((time.perf_counter() - t0) / 60, 1)}
    with open(args.out, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for row in rows + failed:
            f.write(json.dumps(row) + "\n")
    print(f"\noriginal {meta['original_ms']} ms NCHW, {meta['original_cl_ms']} ms channels_last "
          f"({meta['original_cl_speedup']}x); top-1 {before['top1']:.2%} on {before['images']} "
          f"images; batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| setting | layers | ranks | forms | MACs reduction (model) | top-1 data-free | "
          "top-1 calibrated | drop | ms | speed-up vs original | vs channels_last original | "
          "speed-up / MACs reduction | layers slower |")
    print("|---" * 13 + "|")
    for r in rows:
        red = r["macs_before"] / r["macs_after"]
        df = r.get("top1_datafree")
        print(f"| {r['setting']} | {r['layers_decomposed']} | {','.join(map(str, r['ranks']))} | "
              f"{','.join(r['forms'])} | {red:.2f}x | {'-' if df is None else f'{df:.2%}'} | "
              f"{r['top1']:.2%} | {r['drop']:.2f} | {r['ms']} | {r['speedup_vs_original']}x | "
              f"{r['speedup_vs_original_cl']}x | {r['speedup_over_macs_reduction']} | "
              f"{r['layers_slower']} |")
    for r in failed:
        print(f"\n{r['setting']}: not reachable: {r['error']}")
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
