"""Every factorization method at equal multiply-adds on the pretrained CIFAR ResNets.

    python experiments/methods_table.py --model resnet20 --phase accuracy
    python experiments/methods_table.py --model resnet56 --phase accuracy
    python experiments/methods_table.py --model resnet56 --phase speed    # on a quiet machine
    python experiments/methods_table.py --write                          # docs/results-methods.md

accuracy: for every method (and ``auto``) and MACs budget, factor every 3x3 conv but the stem
(``--exclude conv1``) data-free, score it on all 10,000 test JPEGs, calibrate it on 512
unlabeled training JPEGs (the tool's defaults: joint refit), score it again. ``auto+out`` is
``auto`` with the budget spread by output errors measured on the first 128 calibration images
(``--allocate output``); its "data-free" column is before calibration but not without data.
Each model is saved under out/methods/ for the speed phase (which rebuilds a missing one
data-free: the same plan, so the same shapes and the same clock); the numbers go to
experiments/results/methods_<model>.json.

speed: every saved model against the original, whole model, interleaved rounds, median, at
batch 1 and 64, NCHW input, each model in its default layout and channels_last (weights laid
out channels_last: PyTorch then computes channels_last), one thread. Run it with nothing else
on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _paths import MODELS, TEST, TRAIN

import decompose
from decompose.data import calibration_batches, make_loader
from decompose.engine.layout import to_channels_last_
from decompose.io.files import load_model
from decompose.measure.clock import allocator_settings, compare_latency, speedups
from decompose.measure.compare import cache_batches, evaluate_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "methods"
RESULTS = ROOT / "experiments" / "results"
DOC = ROOT / "docs" / "results-methods.md"
METHODS = ["nd", "nd-mixed", "cp", "cp4", "tucker2", "spatial-svd", "channel-svd", "auto",
           "auto+out"]


def _original(name: str) -> torch.nn.Module:
    return load_model(MODELS / f"{name}.th",
                      arch=f"decompose.models.cifar_resnet:{name}").model.eval()


def _config(method: str, target: float) -> decompose.DecomposeConfig:
    alloc = "output" if method.endswith("+out") else "kernel"
    return decompose.DecomposeConfig(method=method.split("+")[0], target_macs=target,
                                     allocation=alloc, exclude=("conv1",),
                                     input_shape=(3, 32, 32))


def accuracy(args) -> None:
    torch.set_num_threads(args.threads)
    original = _original(args.model)
    test = cache_batches(make_loader(TEST, batch_size=500, limit=args.test_images, seed=0),
                         quiet=True)
    calib = list(calibration_batches(TRAIN, n_samples=args.calib_images))
    path = RESULTS / f"methods_{args.model}.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    base = evaluate_model(original, test, quiet=True)
    data.update(model=args.model, original_top1=base["top1"], test_images=base["images"],
                calib_images=args.calib_images, torch=torch.__version__)
    print(f"{args.model}: top-1 {base['top1']:.2%} on {base['images']} images", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["target"]) for r in data["rows"]}
    for method in args.methods.split(","):
        for target in [float(t) for t in args.targets.split(",")]:
            if (method, target) in done and not args.redo:
                continue
            cfg = _config(method, target)
            model = copy.deepcopy(original)
            t0 = time.perf_counter()
            curves = None
            if cfg.allocation == "output":
                curves = decompose.api.measure_curves(original, cfg, calib, 128)
            try:
                rep = decompose.decompose_(model, cfg, error_curves=curves)
            except decompose.errors.BudgetError as e:  # e.g. nd-mixed's cheapest pair > 25%
                row = dict(method=method, target=target, note=str(e).split(";")[0])
                data["rows"] = [r for r in data["rows"] if (r["method"], r["target"]) !=
                                (method, target)] + [row]
                path.write_text(json.dumps(data, indent=1))
                print(f"{method:12s} {target:.2f}: {row['note']}", flush=True)
                continue
            seconds = time.perf_counter() - t0
            free = evaluate_model(model, test, quiet=True)["top1"]
            decompose.save(model, OUT / f"{args.model}-{method}-{target}-free.pt", rep,
                           force=True)
            t1 = time.perf_counter()
            cal = decompose.calibrate_(model, original, calib, samples=args.calib_images,
                                       progress=False)
            calib_seconds = time.perf_counter() - t1
            fitted = evaluate_model(model, test, quiet=True)["top1"]
            decompose.save(model, OUT / f"{args.model}-{method}-{target}-cal.pt", rep,
                           force=True)
            done_layers = rep.decomposed
            t = rep.totals
            row = dict(method=method, target=target, layers=len(done_layers),
                       macs_ratio=t["macs_after"] / t["macs_before"],
                       decomposed_macs_ratio=t["decomposed_macs_ratio"],
                       params_ratio=t["params_after"] / t["params_before"],
                       kernel_error=(sum(lp.kernel_error for lp in done_layers) /
                                     max(len(done_layers), 1)),
                       methods={m: sum(lp.method == m for lp in done_layers)
                                for m in sorted({lp.method for lp in done_layers})},
                       top1_datafree=free, top1_calibrated=fitted, seconds=seconds,
                       calib_seconds=calib_seconds,
                       calib_error_after=sum(lc.error_after for lc in cal.layers) /
                       max(len(cal.layers), 1))
            data["rows"] = [r for r in data["rows"] if (r["method"], r["target"]) !=
                            (method, target)] + [row]
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))
            print(f"{method:12s} {target:.2f}: MACs x{row['macs_ratio']:.3f} kern.err "
                  f"{row['kernel_error']:.4f} top-1 {free:.2%} -> {fitted:.2%} "
                  f"({seconds:.1f} s + {calib_seconds:.1f} s) {row['methods']}", flush=True)


def _rebuild(original: torch.nn.Module, method: str, target: float) -> torch.nn.Module:
    """The factorized model of an accuracy row whose file is gone, data-free (the plan is
    deterministic; calibration changes weights, not shapes (at most a bias is added), so the
    clock is the same)."""
    cfg = _config(method, target)
    curves = None
    if cfg.allocation == "output":
        calib = list(calibration_batches(TRAIN, n_samples=512))
        curves = decompose.api.measure_curves(original, cfg, calib, 128)
    model = copy.deepcopy(original)
    decompose.decompose_(model, cfg, error_curves=curves)
    return model.eval()


def speed(args) -> None:
    path = RESULTS / f"methods_{args.model}.json"
    data = json.loads(path.read_text())
    original = _original(args.model)
    original_cl = copy.deepcopy(original)
    to_channels_last_(original_cl)
    g = torch.Generator().manual_seed(0)
    for row in data["rows"]:
        if "note" in row:
            continue
        f = OUT / f"{args.model}-{row['method']}-{row['target']}-cal.pt"
        if f.exists():
            model = decompose.load(f).eval()
        else:  # speed depends on the layers' shapes only: rebuild them (same plan, no data)
            model = _rebuild(original, row["method"], row["target"])
        model_cl = copy.deepcopy(model)
        to_channels_last_(model_cl)
        sp = {}
        for batch in (1, 64):
            x = torch.randn(batch, 3, 32, 32, generator=g)
            res = compare_latency({"original": original, "original_cl": original_cl,
                                   "model": model, "model_cl": model_cl}, x,
                                  repeats=args.repeats, warmup=3, threads=1)
            s = speedups(res, "original")
            sp[f"b{batch}"] = {"nchw": s["model"], "channels_last": s["model_cl"],
                               "vs_original_cl": res["original_cl"].median_ms /
                               res["model_cl"].median_ms,
                               "original_ms": res["original"].median_ms}
        row["speedup"] = sp
        print(f"{row['method']:12s} {row['target']:.2f}: " + ", ".join(
            f"b{b} {v['nchw']:.2f}x / cl {v['channels_last']:.2f}x"
            for b, v in ((k[1:], v) for k, v in sp.items())), flush=True)
    data["speed"] = {"threads": 1, "repeats": args.repeats, "allocator": allocator_settings(),
                     "input": "random N(0,1), NCHW"}
    path.write_text(json.dumps(data, indent=1))


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def _latency_budget_section() -> list[str]:
    """The ``--method auto --target-latency 0.7`` run (experiments/auto_latency.py)."""
    path = RESULTS / "auto_latency_resnet56.json"
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    p, t = d["plan"], d["plan"]["totals"]
    lp = p["latency_plan"]
    alt = []
    if "allocate_output" in d:
        a = d["allocate_output"]
        chosen = ", ".join(f"{m} {n}" for m, n in sorted(a["methods"].items()))
        top1 = 100 * d["teacher"]["top1"] - a["accuracy"]["drop_top1"]
        alt = [f"| the same budget with `--allocate output` (128 images; {chosen}), "
               f"calibrated | {top1:.2f} |"]
    out = ["## resnet56, `--method auto --target-latency 0.7`", "",
           "Commands: the docstring of `experiments/auto_latency.py` (the CLI run, "
           "`experiments/finetune_resnet.py --decomposed`, then the clock). The planner timed "
           f"every option of every method (batch {lp['batch_size']}, {lp['threads']} thread, "
           f"channels_last) and predicted {lp['predicted_fraction']:.3f} of the original's "
           f"{lp['whole_ms']:.1f} ms; layers chosen: " + ", ".join(
               f"{m} {n}" for m, n in sorted(p["methods"].items())) +
           f"; MACs x{t['macs_after'] / t['macs_before']:.3f}, params "
           f"x{t['params_after'] / t['params_before']:.3f}.", "",
           "| model (10,000 test JPEGs) | top-1 |", "|---|---|",
           f"| original, as shipped | {100 * d['teacher']['top1']:.2f} |",
           f"| auto at latency 0.7, calibrated on {p['calibration']['samples']} images | "
           f"{100 * d['before']['top1']:.2f} |",
           *alt,
           f"| auto at latency 0.7 (kernel errors), fine-tuned {d['epochs']} epochs on "
           f"{d['train_images']} images | "
           f"**{100 * d['after']['top1']:.2f}** |",
           f"| original fine-tuned the same way (control, docs/finetune.md) | "
           f"{d['control_top1_recorded']:.2f} |", ""]
    sp = d.get("speed")
    if sp:
        out += ["Measured whole model, 1 thread, median of interleaved rounds "
                "(`python experiments/auto_latency.py`):", "",
                "| batch | original ms | original channels_last ms | planned ms | "
                "fraction of original cl | fraction of original |", "|---|---|---|---|---|---|"]
        for b in ("b1", "b64"):
            v = sp[b]
            out.append(f"| {b[1:]} | {v['original_ms']:.2f} | {v['original_cl_ms']:.2f} | "
                       f"{v['planned_ms']:.2f} | {v['fraction_of_original_cl']:.3f} | "
                       f"{v['fraction_of_original']:.3f} |")
        out.append("")
    ck = d.get("checked")
    if ck:
        clp = ck["latency_plan"]
        chosen = ", ".join(f"{m} {n}" for m, n in sorted(ck["methods"].items()))
        rounds = ", ".join(f"{f:.3f}" for f in clp["measured_rounds"])
        out += ["With the planner's whole-model check (the same command, after it was added: "
                "docs/speed.md): measured "
                f"{rounds} in its rounds ({'met' if clp['met'] else 'not met'}); layers {chosen}; "
                f"top-1 after calibration {100 * d['teacher']['top1'] - ck['accuracy']['drop_top1']:.2f}% "
                f"({ck['accuracy']['drop_top1']:.2f} below the original). Timed again alone "
                "(`python experiments/auto_latency.py --key checked`): " + "; ".join(
                    f"batch {b[1:]} {ck[b]['fraction_of_original_cl']:.3f} of the original laid "
                    f"out channels_last ({ck[b]['fraction_of_original']:.3f} of it in NCHW)"
                    for b in ("b1", "b64")) + "."]
        if ck.get("finetuned"):
            ft = ck["finetuned"]
            out[-1] += (f" Fine-tuned the same way ({ft['epochs']} epochs on {ft['train_images']} "
                        f"images): {100 * ft['after']['top1']:.2f}% (control "
                        f"{d['control_top1_recorded']:.2f}%).")
        nu = d.get("checked_no_unmap")
        if nu:
            out[-1] += (" Most of the gap to the planner's 0.697 is the memory allocator (glibc "
                        "raises its mmap threshold as a long-running process frees large blocks, "
                        "as the planner's had; a fresh process starts low). With it raised from "
                        "the start (" + ", ".join(
                            f"{k}={v}" for k, v in nu["allocator"].items()) + "): " + "; ".join(
                            f"batch {b[1:]} {nu[b]['fraction_of_original_cl']:.3f} "
                            f"({nu[b]['fraction_of_original']:.3f} of the NCHW original)"
                            for b in ("b1", "b64")) + " (docs/speed.md: the allocator).")
        out.append("")
    return out


def write_doc() -> None:
    lines = ["# Results: every method at equal multiply-adds", "",
             "Written by `python experiments/methods_table.py --write` from "
             "experiments/results/methods_*.json; the commands that made them are in the "
             "script's docstring. Every 3x3 conv but the stem is factorized; *MACs* is the "
             "budget (fraction of those layers' multiply-adds), *MACs x* the whole model's "
             "ratio; top-1 on all 10,000 CIFAR-10 test JPEGs, data-free and after calibration "
             "on 512 unlabeled training JPEGs; speed-up = original ms / factorized ms, whole "
             "model, 1 thread, median of interleaved rounds (*cl*: both laid out "
             "channels_last).", ""]
    for path in sorted(RESULTS.glob("methods_*.json")):
        d = json.loads(path.read_text())
        lines += [f"## {d['model']} (original {_pct(d['original_top1'])}%)", "",
                  "| method | MACs | MACs x | params x | kern.err | top-1 data-free | "
                  "top-1 calibrated | drop | b1 | b1 cl | b64 | b64 cl | seconds | calib s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        order = {m: i for i, m in enumerate(METHODS)}
        for r in sorted(d["rows"], key=lambda r: (-r["target"], order.get(r["method"], 99))):
            if "note" in r:
                lines.append(f"| {r['method']} | {r['target']:g} | {r['note']} |" + " |" * 11)
                continue
            sp = r.get("speedup", {})

            def s(b, k, sp=sp):
                v = sp.get(b, {}).get(k)
                return "-" if v is None else f"{v:.2f}"
            lines.append(
                f"| {r['method']} | {r['target']:g} | {r['macs_ratio']:.3f} | "
                f"{r['params_ratio']:.3f} | {r['kernel_error']:.3f} | "
                f"{_pct(r['top1_datafree'])} | {_pct(r['top1_calibrated'])} | "
                f"{100 * (d['original_top1'] - r['top1_calibrated']):.2f} | "
                f"{s('b1', 'nchw')} | {s('b1', 'channels_last')} | {s('b64', 'nchw')} | "
                f"{s('b64', 'channels_last')} | {r['seconds']:.1f} | {r['calib_seconds']:.1f} |")
        auto = [r for r in d["rows"] if r["method"].startswith("auto") and "note" not in r]
        if auto:
            lines += ["", "Methods chosen by auto, per budget (layers): " + "; ".join(
                f"{r['method']} {r['target']:g}: " + ", ".join(
                    f"{m} {n}" for m, n in r["methods"].items()) for r in auto)]
        lines.append("")
    lines += _latency_budget_section()
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    ap.add_argument("--phase", choices=["accuracy", "speed"], default="accuracy")
    ap.add_argument("--write", action="store_true", help="only regenerate the docs table")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default="0.5,0.25")
    ap.add_argument("--test-images", type=int, default=None)
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--redo", action="store_true")
    args = ap.parse_args()
    if args.write:
        write_doc()
    elif args.phase == "accuracy":
        accuracy(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
