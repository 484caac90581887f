"""Which exact form of a decoupled conv is fast on this CPU, in PyTorch eager? (issue 5)

A rank-T decoupled layer (decompose.methods.nd.layers.decouple_conv) can be computed in many exactly
equivalent ways. This script times them side by side against the dense conv they replace, per
layer shape, order and T, then end to end on a CIFAR ResNet-56, and writes the tables into
docs/layouts.md (between the markers; the prose around them is kept).

    python experiments/bench_layouts.py            # everything, a few minutes on 2 cores
    python experiments/bench_layouts.py --quick    # smoke run, fewer shapes/ranks/repeats
    python experiments/bench_layouts.py --no-write # print only

Every number is a speed-up over the dense NCHW conv of the same shape (> 1 = faster), the median
over rounds of the paired ratio, all forms of one row timed interleaved in one process
(decompose.measure.clock.compare_latency). The machine is shared: only ratios within a row mean much.
"""

from __future__ import annotations

import argparse
import copy
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from decompose.engine.surgery import replace_module
from decompose.measure.clock import compare_latency, speedups
from decompose.methods.nd.forms import auto_form, estimated_speedup, fast_form
from decompose.methods.nd.layers import decouple_conv
from decompose.models.cifar_resnet import resnet56

# ----------------------------------------------------------------------------------------------
# settings
# (name, batch, C_in, C_out, input H=W, stride); all 3x3, padding 1, no bias, float32
SHAPES = [
    ("cifar 16->16 @32 b64", 64, 16, 16, 32, 1),
    ("cifar 32->32 @16 b64", 64, 32, 32, 16, 1),
    ("cifar 64->64 @8 b64", 64, 64, 64, 8, 1),
    ("cifar 16->32 @32 s2 b64", 64, 16, 32, 32, 2),
    ("cifar 32->64 @16 s2 b64", 64, 32, 64, 16, 2),
    ("imnet 64->64 @56 b8", 8, 64, 64, 56, 1),
    ("imnet 256->256 @14 b8", 8, 256, 256, 14, 1),
]
RANKS = (1, 2, 3, 4, 6, 9)
ORDERS = ("dw-pw", "pw-dw")
REPEATS = 25          # measured rounds per row (each round times every form once)
WARMUP = 3
THREADS = None        # None: torch's default (torch.get_num_threads())
TIMER = "wall"        # "wall": time.perf_counter; "cpu": time.process_time, the CPU time of this
                      # process, which a busy shared machine disturbs far less (use with 1 thread:
                      # with more it sums the threads and counts oneDNN's spin-waiting)
# the extra, bench-only forms of (b), (c), (e), (h) are timed on these shapes and ranks only
EXTRA_SHAPES = ("cifar 16->16 @32 b64", "cifar 64->64 @8 b64", "cifar 32->64 @16 s2 b64")
EXTRA_RANKS = (2, 4)
MODEL_RANKS = (1, 2, 4)
MODEL_BATCH = 64
MODEL_REPEATS = 12
DOC = Path(__file__).resolve().parents[1] / "docs" / "layouts.md"
BEGIN, END = "<!-- bench_layouts:begin -->", "<!-- bench_layouts:end -->"

CL = torch.channels_last
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


# ----------------------------------------------------------------------------------------------
# bench-only forms (dw-pw order). Each is exact; checked against the Sequential before timing.
class TMajor(nn.Module):
    """(c) depthwise outputs t-major (channel t*C + c): tile the input T times (x.repeat), one
    multiplier-1 depthwise conv with the weight rows permuted, pointwise columns permuted."""

    def __init__(self, seq: nn.Sequential, t: int):
        super().__init__()
        dw, pw = seq.conv_dw, seq.conv_pw
        c = dw.in_channels
        self.t = t
        self.dw = nn.Conv2d(c * t, c * t, dw.kernel_size, dw.stride, dw.padding, dw.dilation,
                            groups=c * t, bias=False)
        self.pw = nn.Conv2d(c * t, pw.out_channels, 1, bias=pw.bias is not None)
        with torch.no_grad():
            self.dw.weight.copy_(dw.weight.view(c, t, *dw.weight.shape[1:]).transpose(0, 1)
                                 .reshape(self.dw.weight.shape))
            w = pw.weight.view(pw.out_channels, c, t).transpose(1, 2)
            self.pw.weight.copy_(w.reshape(self.pw.weight.shape))
            if pw.bias is not None:
                self.pw.bias.copy_(pw.bias)

    def forward(self, x):
        return self.pw(self.dw(x.repeat(1, self.t, 1, 1)))


class Split(nn.Module):
    """(b) T separate multiplier-1 depthwise convs on the same input; either concatenated
    (t-major) into one pointwise conv, or each into its own pointwise slice and summed."""

    def __init__(self, seq: nn.Sequential, t: int, concat: bool):
        super().__init__()
        dw, pw = seq.conv_dw, seq.conv_pw
        c, o = dw.in_channels, pw.out_channels
        self.concat = concat
        wd = dw.weight.view(c, t, *dw.weight.shape[1:])
        wp = pw.weight.view(o, c, t)
        self.dws = nn.ModuleList()
        for i in range(t):
            d = nn.Conv2d(c, c, dw.kernel_size, dw.stride, dw.padding, dw.dilation, groups=c,
                          bias=False)
            d.weight.data.copy_(wd[:, i])
            self.dws.append(d)
        if concat:
            self.pw = nn.Conv2d(c * t, o, 1, bias=pw.bias is not None)
            self.pw.weight.data.copy_(wp.transpose(1, 2).reshape(o, c * t, 1, 1))
            if pw.bias is not None:
                self.pw.bias.data.copy_(pw.bias)
        else:
            self.pws = nn.ModuleList()
            for i in range(t):
                p = nn.Conv2d(c, o, 1, bias=(i == 0 and pw.bias is not None))
                p.weight.data.copy_(wp[:, :, i].reshape(o, c, 1, 1))
                if p.bias is not None:
                    p.bias.data.copy_(pw.bias)
                self.pws.append(p)

    def forward(self, x):
        if self.concat:
            return self.pw(torch.cat([d(x) for d in self.dws], 1))
        y = self.pws[0](self.dws[0](x))
        for d, p in zip(self.dws[1:], self.pws[1:]):
            y = y + p(d(x))
        return y


def dw_as_groups(seq: nn.Sequential, groups: int) -> nn.Sequential:
    """(e) the depthwise conv as a conv with fewer groups (groups=1: dense), zeros off the
    diagonal blocks: more multiply-adds, but oneDNN's dense/grouped kernels."""
    dw, pw = seq.conv_dw, seq.conv_pw
    c, ct = dw.in_channels, dw.out_channels
    t = ct // c
    new = nn.Conv2d(c, ct, dw.kernel_size, dw.stride, dw.padding, dw.dilation, groups=groups,
                    bias=False)
    cg = c // groups
    w = torch.zeros(ct, cg, *dw.kernel_size)
    for j in range(ct):  # output j = ch*T + t reads input channel ch = j // T
        w[j, (j // t) % cg] = dw.weight[j, 0].detach()
    new.weight.data.copy_(w)
    return nn.Sequential(new, copy.deepcopy(pw))


class Unfold(nn.Module):
    """(e) the depthwise conv as im2col (F.unfold) + a per-channel contraction, then the 1x1."""

    def __init__(self, seq: nn.Sequential, t: int):
        super().__init__()
        dw = seq.conv_dw
        self.geom = dict(kernel_size=dw.kernel_size, dilation=dw.dilation, padding=dw.padding,
                         stride=dw.stride)
        self.c, self.t = dw.in_channels, t
        self.w = nn.Parameter(dw.weight.detach().reshape(self.c, t, -1).clone())
        self.pw = copy.deepcopy(seq.conv_pw)

    def forward(self, x):
        n, _, h, w = x.shape
        k, s, p, d = (self.geom[a] for a in ("kernel_size", "stride", "padding", "dilation"))
        ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        cols = F.unfold(x, **self.geom).view(n, self.c, k[0] * k[1], ho * wo)
        y = torch.einsum("nckl,ctk->nctl", cols, self.w)
        return self.pw(y.reshape(n, self.c * self.t, ho, wo))


class NoMkldnn(nn.Module):
    """(h) the plain Sequential with oneDNN switched off (PyTorch's native conv kernels)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        with torch.backends.mkldnn.flags(enabled=False):
            return self.m(x)


# ----------------------------------------------------------------------------------------------
def macs_ratio(c_in: int, c_out: int, t: int, order: str, stride: int) -> float:
    """Decoupled / dense multiply-adds (3x3). pw-dw runs its 1x1 at the input resolution."""
    dense = c_out * c_in * 9
    if order == "dw-pw":
        dec = t * c_in * (9 + c_out)
    else:
        dec = t * c_out * (c_in * stride * stride + 9)
    return dec / dense


def check_exact(ref_mod: nn.Module, forms: dict, x: torch.Tensor, xcl: torch.Tensor) -> None:
    with torch.inference_mode():
        ref = ref_mod(x)
        for name, m in forms.items():
            if name.startswith("dense"):
                continue
            y = m(xcl if name.endswith("_cl") else x)
            err = (y - ref).abs().max().item() / ref.abs().max().item()
            if err > 1e-4:
                raise AssertionError(f"form {name} is not exact: relative error {err:.1e}")


def warm_up_process() -> None:
    """Untimed convs first, so that the first row does not pay for the process's first big
    allocations and oneDNN's start-up."""
    conv = nn.Conv2d(64, 64, 3, padding=1)
    with torch.inference_mode():
        for _ in range(5):
            conv(torch.randn(64, 64, 32, 32))
            conv.to(memory_format=CL)(torch.randn(64, 64, 32, 32).contiguous(memory_format=CL))


def layer_rows(shapes, ranks, orders, repeats, extra: bool):
    rows = []
    for name, n, c_in, c_out, h, stride in shapes:
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False).eval()
        x = torch.randn(n, c_in, h, h)
        xcl = x.contiguous(memory_format=CL)
        for order in orders:
            for t in ranks:
                seq = decouple_conv(conv, t, order).eval()
                forms = {"dense": conv, "plain": seq}
                if t > 1:
                    forms["dw1"] = fast_form(seq, "dw1")
                forms["dense_cl"] = copy.deepcopy(conv).to(memory_format=CL)
                forms["plain_cl"] = copy.deepcopy(seq).to(memory_format=CL)
                if t > 1:
                    forms["dw1_cl"] = fast_form(seq, "dw1").to(memory_format=CL)
                if extra and order == "dw-pw" and t > 1:
                    forms["tmajor"] = TMajor(seq, t)
                    forms["split-cat"] = Split(seq, t, concat=True)
                    forms["split-sum"] = Split(seq, t, concat=False)
                    forms["dw-dense"] = dw_as_groups(seq, 1)
                    forms[f"dw-g{c_in // 16}"] = dw_as_groups(seq, c_in // 16)
                    forms["unfold"] = Unfold(seq, t)
                    forms["no-mkldnn"] = NoMkldnn(seq)
                    forms["tmajor_cl"] = TMajor(seq, t).to(memory_format=CL)
                    forms["split-cat_cl"] = Split(seq, t, concat=True).to(memory_format=CL)
                check_exact(seq, forms, x, xcl)
                res = compare_latency(forms, x, repeats=repeats, warmup=WARMUP, threads=THREADS,
                                      timer=TIMERS[TIMER],
                                      inputs={k: xcl for k in forms if k.endswith("_cl")})
                sp = speedups(res, "dense")
                row = dict(shape=name, order=order, T=t, auto=auto_form(seq),
                           est=estimated_speedup(seq),
                           macs=macs_ratio(c_in, c_out, t, order, stride),
                           dense_ms=res["dense"].median_ms, speedup=sp)
                rows.append(row)
                print(f"{name:24s} {order} T={t}  macs x{row['macs']:.2f}  auto {row['auto']:5s} "
                      f"(est x{row['est']:.2f})  dense "
                      f"{row['dense_ms']:6.2f} ms  "
                      + "  ".join(f"{k}={v:.2f}" for k, v in sp.items() if k != "dense"),
                      flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# end to end: the project's CIFAR ResNet-56 (real weights from ../shared when present; speed does
# not depend on them), every 3x3 conv except the stem decoupled.
SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared/models/cifar-resnet/resnet56.th"


def resnet56_model() -> nn.Module:
    model = resnet56()
    if SHARED_WEIGHTS.exists():
        sd = torch.load(SHARED_WEIGHTS, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    return model.eval()


def decoupled_model(model: nn.Module, t: int, form: str, order: str = "dw-pw") -> nn.Module:
    m = copy.deepcopy(model)
    for name, conv in list(m.named_modules()):
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and name != "conv1":
            replace_module(m, name, fast_form(decouple_conv(conv, t, order), form))
    return m.eval()


def model_rows(ranks, repeats):
    torch.manual_seed(0)
    base = resnet56_model()
    x = torch.randn(MODEL_BATCH, 3, 32, 32)
    xcl = x.contiguous(memory_format=CL)
    rows = []
    for t in ranks:
        mods = {"dense": base, "dense_cl": copy.deepcopy(base).to(memory_format=CL)}
        for form in ("plain", "dw1", "auto"):
            if form == "dw1" and t == 1:
                continue
            m = decoupled_model(base, t, form)
            mods[form] = m
            mods[form + "_cl"] = copy.deepcopy(m).to(memory_format=CL)
        with torch.inference_mode():
            ref = mods["plain"](x)
            for k, m in mods.items():
                if not k.startswith("dense"):
                    y = m(xcl if k.endswith("_cl") else x)
                    assert torch.allclose(y, ref, rtol=1e-3, atol=1e-4), k
        res = compare_latency(mods, x, repeats=repeats, warmup=2, threads=THREADS, timer=TIMERS[TIMER],
                              inputs={k: xcl for k in mods if k.endswith("_cl")})
        sp = speedups(res, "dense")
        rows.append(dict(T=t, dense_ms=res["dense"].median_ms, speedup=sp))
        print(f"ResNet-56 b{MODEL_BATCH} T={t} dense {res['dense'].median_ms:.1f} ms  "
              + "  ".join(f"{k}={v:.2f}" for k, v in sp.items() if k != "dense"), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
def fmt(v):
    return "" if v is None else f"{v:.2f}"


def markdown(rows, extra_rows, mrows, argv, seconds) -> str:
    main_cols = ["plain", "dw1", "dense_cl", "plain_cl", "dw1_cl"]
    out = [BEGIN, "",
           f"Generated by `python {' '.join(argv)}` in {seconds:.0f} s: torch {torch.__version__}, "
           f"{torch.get_num_threads() if THREADS is None else THREADS} threads "
           f"(torch.get_num_threads()), {platform.processor() or platform.machine()}, "
           f"python {platform.python_version()}, float32, eager, inference_mode, "
           f"{REPEATS} interleaved rounds per row, clock: {TIMER} "
           f"({TIMERS[TIMER].__module__}.{TIMERS[TIMER].__name__}).",
           "",
           "Speed-up over the dense NCHW conv of the same shape (> 1 faster; median of paired "
           "per-round ratios). `macs` = decoupled / dense multiply-adds. `_cl`: weights and input "
           "channels_last. `dense` forms have the speed of the original conv whatever T (the "
           "rebuilt W_T has the same shape). `auto (est)`: the form `fast_form(seq, \"auto\")` "
           "picks and its `estimated_speedup`.",
           "",
           "| layer (batch) | order | T | macs | dense ms | " + " | ".join(main_cols)
           + " | auto (est) |",
           "|---|---|---|---|---|" + "---|" * len(main_cols) + "---|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['order']} | {r['T']} | {r['macs']:.2f} | "
                   f"{r['dense_ms']:.2f} | "
                   + " | ".join(fmt(r["speedup"].get(c)) for c in main_cols)
                   + f" | {r['auto']} ({r['est']:.2f}) |")
    if extra_rows:
        cols = [k for k in extra_rows[0]["speedup"] if k != "dense"]
        cols = list(dict.fromkeys(c if not c.startswith("dw-g") else "dw-g(C/16)" for c in cols))
        out += ["", "Bench-only exact forms, dw-pw order (same units):", "",
                "| layer (batch) | T | " + " | ".join(cols) + " |",
                "|---|---|" + "---|" * len(cols)]
        for r in extra_rows:
            sp = {("dw-g(C/16)" if k.startswith("dw-g") else k): v for k, v in r["speedup"].items()}
            out.append(f"| {r['shape']} | {r['T']} | " + " | ".join(fmt(sp.get(c)) for c in cols)
                       + " |")
    if mrows:
        cols = ["plain", "dw1", "auto", "dense_cl", "plain_cl", "dw1_cl", "auto_cl"]
        out += ["", f"End to end, CIFAR ResNet-56, batch {MODEL_BATCH}, every 3x3 conv but the "
                "stem decoupled (dw-pw), speed-up over the dense NCHW model (`_cl`: model and "
                "input channels_last):", "",
                "| T | dense ms | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for r in mrows:
            out.append(f"| {r['T']} | {r['dense_ms']:.1f} | "
                       + " | ".join(fmt(r["speedup"].get(c)) for c in cols) + " |")
    out += ["", END]
    return "\n".join(out)


def write_doc(block: str, doc: Path) -> None:
    text = doc.read_text() if doc.exists() else f"# Layouts\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text,
                  flags=re.DOTALL)
    doc.write_text(text)


def main() -> None:
    global REPEATS, THREADS, TIMER
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 shapes, T in 1,4, 5 rounds")
    ap.add_argument("--no-write", action="store_true", help="do not touch docs/layouts.md")
    ap.add_argument("--no-model", action="store_true", help="skip the ResNet-56 timing")
    ap.add_argument("--no-extra", action="store_true", help="skip the bench-only forms")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (default: torch's)")
    ap.add_argument("--ranks", type=str, default=None, help="comma-separated T values to time")
    ap.add_argument("--shapes", type=str, default=None,
                    help="only the layer shapes whose name contains this text (e.g. cifar)")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="rounds per layer row")
    ap.add_argument("--cpu-time", action="store_true", help='TIMER = "cpu" (see settings)')
    ap.add_argument("--doc", type=Path, default=DOC, help="markdown file to write the tables in")
    args = ap.parse_args()
    THREADS, TIMER = args.threads, ("cpu" if args.cpu_time else TIMER)
    REPEATS = args.repeats
    shapes, ranks, mranks, mrep = SHAPES, RANKS, MODEL_RANKS, MODEL_REPEATS
    if args.quick:
        shapes, ranks, mranks, mrep, REPEATS = SHAPES[:2], (1, 4), (2,), 3, 5
    if args.ranks:
        ranks = tuple(int(t) for t in args.ranks.split(","))
        mranks = tuple(t for t in mranks if t in ranks) or ranks
    if args.shapes:
        shapes = [sh for sh in shapes if args.shapes in sh[0]]
    t0 = time.time()
    warm_up_process()
    rows = layer_rows(shapes, ranks, ORDERS, REPEATS, extra=False)
    extra_rows = []
    if not args.no_extra:
        print("-- bench-only forms --", flush=True)
        extra_rows = layer_rows([s for s in shapes if s[0] in EXTRA_SHAPES],
                                [t for t in EXTRA_RANKS if t in ranks or args.quick],
                                ("dw-pw",), REPEATS, extra=True)
    mrows = [] if args.no_model else model_rows(mranks, mrep)
    block = markdown(rows, extra_rows, mrows, ["experiments/bench_layouts.py"] + sys.argv[1:],
                     time.time() - t0)
    print(block)
    if not args.no_write and not args.quick:
        write_doc(block, args.doc)
        print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
