"""PNG figures of a report and of a sweep (matplotlib, optional: ``pip install decompose[plot]``).

* ``spectra.png``: per decoupled layer, the fraction of squared singular values kept at T = 1..r
  ("energy kept vs T"), one panel per order; a dot marks the rank the plan chose.
* ``kernel_error.png``: per decoupled layer, the relative kernel error ``||W - W_T|| / ||W||`` vs
  T, one panel per order; a dot marks the chosen rank.
* ``sweep.png``: top-1 against the MACs ratio (left) and measured speed-up against the MACs ratio
  (right, with the speed-up fewer multiply-adds alone would promise as a dashed line).

Figures are written with the non-interactive Agg backend; nothing is shown on screen. Each is
rendered in memory and written by :func:`decompose.io.write.write_bytes` (atomic; an existing
figure is only replaced with ``force``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DecomposeError
from ..io.write import check_target, write_bytes
from ..report import Report

LEGEND_MAX = 12  # more layers than this: a colour bar by depth instead of a legend
REPORT_FIGURES = ("spectra.png", "kernel_error.png")
SWEEP_FIGURE = "sweep.png"


def check_plot_targets(out_dir: str | os.PathLike, names: Iterable[str], force: bool = False
                       ) -> None:
    """Fail before any work when ``--plot DIR`` is not a folder, or a figure there exists
    without ``force`` (or is not a regular file)."""
    d = Path(os.fspath(out_dir))
    if os.path.lexists(d) and not d.is_dir():
        raise DecomposeError(f"--plot {d} is not a folder; pass a folder path")
    if d.is_dir():
        for name in names:
            check_target(d / name, force, what="figure")


def _save(fig: Any, path: Path, force: bool) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    return write_bytes(path, buf.getvalue(), force, what="figure")


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise DecomposeError("--plot needs matplotlib; install it with pip install matplotlib "
                             "(or pip install 'decompose[plot]'), or drop --plot") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def layer_curves(model: nn.Module, names: Sequence[str], input_shape: Sequence[int],
                 config: Any = None) -> dict[str, dict[str, dict[str, list]]]:
    """``{layer: {candidate: {"cost": [...], "error": [...], "energy": [...] | None,
    "ranks": [...]}}}``: every option the config's methods (default: Network Decoupling, both
    orders) offer each named conv of ``model`` (the original, undecomposed one); ``cost`` is
    the option's multiply-adds as a fraction of the layer's."""
    from .. import methods as registry
    from ..config import DecomposeConfig
    from ..engine.trace import trace
    from ..methods.convs import conv_macs

    config = config or DecomposeConfig()
    shapes = trace(model, tuple(input_shape))
    methods = [registry.get(n) for n in config.methods]
    out: dict[str, dict[str, dict[str, list]]] = {}
    for name in names:
        conv, call = model.get_submodule(name), shapes[name]
        before = max(conv_macs(conv, call.out_shape), 1)
        out[name] = {}
        for m in methods:
            if m.skip_reason(conv) is not None:
                continue
            variants = (config.order,) if config.order in m.variants else m.variants
            for c in m.candidates(conv, call, variants=variants, seed=config.seed):
                out[name][c.label] = {"cost": [x / before for x in c.macs],
                                      "error": list(c.errors), "ranks": list(c.ranks),
                                      "energy": list(c.energies) if c.energies else None}
    return out


def _layer_colours(plt, n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _curve_figure(plt, curves: dict, chosen: dict[str, tuple[str, Any]], key: str, ylabel: str,
                  title: str, path: Path, force: bool = False) -> Path:
    names = list(curves)
    labels = sorted({lab for per in curves.values() for lab, c in per.items()
                     if c.get(key) is not None})
    colours = _layer_colours(plt, len(names))
    cols = min(len(labels), 4) or 1
    rows = -(-len(labels) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1, 3.8 * rows), sharey=True,
                             layout="constrained", squeeze=False)
    flat = [a for row in axes for a in row]
    xkey = "cost" if key == "error" else "rank index"
    for ax, label in zip(flat, labels):
        for name, colour in zip(names, colours):
            c = curves[name].get(label)
            if not c or c.get(key) is None:
                continue
            ys = c[key]
            xs = c["cost"] if key == "error" else list(range(1, len(ys) + 1))
            ax.plot(xs, ys, color=colour, lw=1.2, alpha=0.85, marker=".", ms=3, label=name)
            lab, rank = chosen.get(name, (None, None))
            if lab == label and rank in c["ranks"]:
                i = c["ranks"].index(rank)
                ax.plot([xs[i]], [ys[i]], "o", color=colour, ms=6, mec="black", mew=0.6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("multiply-adds, fraction of the layer's" if xkey == "cost"
                      else "option (ranks in increasing cost)")
        ax.grid(alpha=0.3)
    for ax in flat[len(labels):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel(ylabel)
    if len(names) <= LEGEND_MAX:
        flat[max(len(labels) - 1, 0)].legend(fontsize=7, loc="best")
    else:
        sm = plt.cm.ScalarMappable(cmap="viridis",
                                   norm=plt.Normalize(vmin=1, vmax=len(names)))
        cbar = fig.colorbar(sm, ax=flat, pad=0.01, aspect=30)
        cbar.set_label(f"layer, in network order (1 = {names[0]}, {len(names)} = {names[-1]})",
                       fontsize=8)
    fig.suptitle(title + " — dot: the option chosen", fontsize=10)
    try:
        return _save(fig, path, force)
    finally:
        plt.close(fig)


def plot_spectra(curves: dict, chosen: dict[str, tuple[str, Any]], path: str | Path,
                 force: bool = False) -> Path:
    """Energy kept (fraction of squared singular values) per option, per layer and candidate
    (methods with singular values)."""
    plt = require_matplotlib()
    return _curve_figure(plt, curves, chosen, "energy", "energy kept (fraction of sum s²)",
                         "Singular-value spectra per layer", Path(path), force)


def plot_kernel_error(curves: dict, chosen: dict[str, tuple[str, Any]], path: str | Path,
                      force: bool = False) -> Path:
    """Relative kernel error against multiply-adds, per layer and candidate."""
    plt = require_matplotlib()
    return _curve_figure(plt, curves, chosen, "error", "relative kernel error ||W-Ŵ||/||W||",
                         "Kernel error against cost per layer", Path(path), force)


def plot_report(report: Report, original: nn.Module, out_dir: str | Path,
                force: bool = False) -> list[Path]:
    """``spectra.png`` (methods with singular values) and ``kernel_error.png`` of the layers
    ``report`` factorized, computed from ``original`` (the model before decomposition).
    Returns the paths written; an existing figure is only replaced with ``force``."""
    require_matplotlib()
    out = _out_dir(out_dir)
    done = report.decomposed
    if not done:
        return []
    from ..config import DecomposeConfig
    fields = {k: v for k, v in report.config.items() if k in ("method", "order", "seed")}
    curves = layer_curves(original, [lp.name for lp in done], report.input_shape,
                          DecomposeConfig(target_macs=0.5, **fields))
    chosen = {lp.name: (f"{lp.method}/{lp.variant}" if lp.variant else lp.method, lp.rank)
              for lp in done}
    paths = []
    if any(c.get("energy") is not None for per in curves.values() for c in per.values()):
        paths.append(plot_spectra(curves, chosen, out / REPORT_FIGURES[0], force))
    paths.append(plot_kernel_error(curves, chosen, out / REPORT_FIGURES[1], force))
    return paths


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path,
               baseline_top1: float | None = None, title: str = "",
               force: bool = False) -> Path:
    """Top-1 vs MACs ratio and measured speed-up vs MACs ratio, one line per order/rule.

    ``rows``: sweep rows with ``macs_ratio``, ``top1`` (or None), ``speedup`` (or None),
    ``order`` and ``rule`` (``rank``, ``energy``, ``target_macs``), as :mod:`decompose.sweep`
    makes them.
    """
    plt = require_matplotlib()
    path = Path(path)
    _out_dir(path.parent)
    groups: dict[str, list[dict[str, Any]]] = {}
    skipped = [r for r in rows if r.get("layers_decomposed") == 0]
    for r in rows:
        if r.get("layers_decomposed") == 0:
            continue  # nothing decoupled: the original model, drawn as the baseline
        groups.setdefault(f"{r.get('rule', '')} {r.get('order', '')}".strip(), []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    markers = "osD^v<>p*"
    for i, (label, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["macs_ratio"])
        xs = [r["macs_ratio"] for r in rs]
        m = markers[i % len(markers)]
        acc = [(x, r["top1"] * 100) for x, r in zip(xs, rs) if r.get("top1") is not None]
        if acc:
            ax1.plot(*zip(*acc), marker=m, ms=4, lw=1.2, label=label)
            for (x, y), r in zip(acc, [r for r in rs if r.get("top1") is not None]):
                ax1.annotate(_tag(r), (x, y), fontsize=6, xytext=(3, -8),
                             textcoords="offset points")
        sp = [(x, r["speedup"]) for x, r in zip(xs, rs) if r.get("speedup") is not None]
        if sp:
            ax2.plot(*zip(*sp), marker=m, ms=4, lw=1.2, label=label)
            for (x, y), r in zip(sp, [r for r in rs if r.get("speedup") is not None]):
                ax2.annotate(_tag(r), (x, y), fontsize=6, xytext=(3, -8),
                             textcoords="offset points")
    if baseline_top1 is not None:
        ax1.axhline(baseline_top1 * 100, color="grey", ls="--", lw=1,
                    label=f"original {baseline_top1:.1%}")
    xs_all = sorted(r["macs_ratio"] for r in rows if r.get("macs_ratio"))
    if xs_all:
        lo, hi = xs_all[0], max(xs_all[-1], 1.0)
        grid = [lo + (hi - lo) * i / 50 for i in range(51)]
        ax2.plot(grid, [1 / x for x in grid], color="grey", ls=":", lw=1,
                 label="1 / MACs ratio (if time ∝ MACs)")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax1.set_xlabel("MACs ratio (decomposed / original, whole model)")
    ax2.set_xlabel("MACs ratio (decomposed / original, whole model)")
    ax1.set_ylabel("top-1 accuracy (%)")
    ax2.set_ylabel("measured speed-up (original ms / decomposed ms)")
    ax2.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator
    ax2.yaxis.set_major_locator(LogLocator(base=2))
    ax2.yaxis.set_minor_locator(LogLocator(base=2, subs=(1.5,)))
    ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    if skipped:  # a legend entry with no line
        names = ", ".join(r.get("setting", "?") for r in skipped[:4])
        more = f" +{len(skipped) - 4}" if len(skipped) > 4 else ""
        ax1.plot([], [], " ", label=f"not drawn (nothing decoupled): {names}{more}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax1.set_title("accuracy vs multiply-adds")
    ax2.set_title("speed-up vs multiply-adds (> 1 is faster)")
    if title:
        fig.suptitle(title, fontsize=10)
    try:
        return _save(fig, path, force)
    finally:
        plt.close(fig)


#: the files ``decompose compare --plot DIR`` writes
COMPARE_FIGURES = ("compare_macs.png", "compare_latency.png")


def plot_compare(rows: Sequence[dict[str, Any]], folder: str | Path,
                 baseline: dict[str, Any] | None = None, title: str = "",
                 force: bool = False) -> list[Path]:
    """The Pareto figures of ``decompose compare``: ``compare_macs.png`` (top-1 vs MACs ratio)
    and ``compare_latency.png`` (top-1 vs measured latency), one colour per method, data-free
    points hollow and dashed, calibrated points filled; the original as a star.

    ``rows``: the comparison's rows (``method``, ``macs_ratio``, ``after_ms``, ``top1``,
    ``top1_datafree``, ``calibrated``)."""
    plt = require_matplotlib()
    out = _out_dir(folder)
    baseline = baseline or {}
    methods: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("layers_decomposed") and r.get("top1") is not None:
            methods.setdefault(str(r.get("method")), []).append(r)
    paths = []
    for name, xkey, xlabel in ((COMPARE_FIGURES[0], "macs_ratio",
                                "MACs ratio (factorized / original, whole model)"),
                               (COMPARE_FIGURES[1], "after_ms",
                                "measured latency (ms, whole model)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
        for i, (method, rs) in enumerate(methods.items()):
            rs = sorted((r for r in rs if r.get(xkey) is not None), key=lambda r: r[xkey])
            if not rs:
                continue
            color = f"C{i % 10}"
            xs = [r[xkey] for r in rs]
            ax.plot(xs, [100 * r["top1"] for r in rs], "-o", color=color, ms=5,
                    label=f"{method}" + (" calibrated" if rs[0].get("calibrated") else ""))
            free = [(x, 100 * r["top1_datafree"]) for x, r in zip(xs, rs)
                    if r.get("top1_datafree") is not None]
            if free:
                ax.plot(*zip(*free), "--o", color=color, ms=5, mfc="none", lw=1,
                        label=f"{method} data-free")
        x0 = 1.0 if xkey == "macs_ratio" else baseline.get("before_ms")
        if baseline.get("top1") is not None and x0 is not None:
            ax.plot([x0], [100 * baseline["top1"]], "*", color="black", ms=11, label="original")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax.set_title(title or "accuracy against cost: up and to the left is better", fontsize=9)
        try:
            paths.append(_save(fig, out / name, force))
        finally:
            plt.close(fig)
    return paths


def _tag(row: dict[str, Any]) -> str:
    """'T=2' from a row's 'T=2 auto' setting."""
    return str(row.get("setting", "")).split(" ")[0]


def _out_dir(d: str | Path) -> Path:
    p = Path(d)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DecomposeError(f"cannot create plot folder {p} ({e.strerror}); pass another "
                             "--plot DIR") from None
    if not p.is_dir():
        raise DecomposeError(f"--plot {p} is not a folder; pass a folder path")
    return p


__all__ = ["COMPARE_FIGURES", "REPORT_FIGURES", "SWEEP_FIGURE", "check_plot_targets",
           "layer_curves", "plot_compare", "plot_kernel_error", "plot_report", "plot_spectra",
           "plot_sweep", "require_matplotlib"]
