"""The report: per-layer rows and totals, rendered as a text table or one JSON object.

The JSON schema is documented in docs/report.md. Later stages (accuracy, output error, latency)
add their objects to the same report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .planning.plan import LayerPlan


@dataclass
class Report:
    layers: list[LayerPlan]
    totals: dict[str, Any]
    config: dict[str, Any]
    input_shape: tuple[int, ...]
    input_shape_source: str = "given"
    output: str | None = None
    accuracy: dict[str, Any] | None = None
    output_error: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decomposed(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.skipped is None]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "layers": [lp.to_dict() for lp in self.layers],
            "totals": dict(self.totals),
            "config": self.config,
            "input_shape": list(self.input_shape),
            "input_shape_source": self.input_shape_source,
            "output": self.output,
        }
        for key in ("accuracy", "output_error", "latency"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        d.update(self.extra)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return render_table(self)


def totals(layers: list[LayerPlan], params_before: int, params_after: int,
           macs_before: int) -> dict[str, Any]:
    """Whole-model totals plus the subtotal over decoupled layers."""
    done = [lp for lp in layers if lp.skipped is None]
    saved = sum(lp.macs_before - lp.macs_after for lp in done)
    lb = sum(lp.macs_before for lp in done)
    la = sum(lp.macs_after for lp in done)
    return {
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_before - saved,
        "layers_decomposed": len(done),
        "layers_skipped": len(layers) - len(done),
        "decomposed_macs_before": lb,
        "decomposed_macs_after": la,
        "decomposed_macs_ratio": (la / lb) if lb else 1.0,
        "decomposed_params_before": sum(lp.params_before for lp in done),
        "decomposed_params_after": sum(lp.params_after for lp in done),
    }


def _num(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_table(r: Report) -> str:
    """A fixed-width per-layer table with totals below (what the CLI prints on stdout)."""
    has_lat = any("latency_before_ms" in lp.extra for lp in r.layers)
    has_out = any("output_rel_error" in lp.extra for lp in r.layers)
    has_form = any("form" in lp.extra for lp in r.layers)
    head = ["layer", "kernel", "order", "rank", "params", "MACs", "kern.err", "energy"]
    if has_form:
        head.append("form")
    if has_out:
        head.append("out.err")
    if has_lat:
        head.append("ms before→after")
    head.append("note")
    rows = []
    for lp in r.layers:
        done = lp.skipped is None
        row = [
            lp.name,
            "x".join(map(str, lp.kernel_shape)),
            lp.order or "-",
            f"{lp.rank}/{lp.max_rank}" if done else "-",
            f"{_num(lp.params_before)}→{_num(lp.params_after)}",
            f"{_num(lp.macs_before)}→{_num(lp.macs_after)}",
            f"{lp.kernel_error:.4f}" if done else "-",
            f"{lp.energy:.4f}" if done else "-",
        ]
        if has_form:
            row.append(str(lp.extra.get("form", "-")))
        if has_out:
            v = lp.extra.get("output_rel_error")
            row.append("-" if v is None else f"{v:.4f}")
        if has_lat:
            row.append(f"{_fmt_ms(lp.extra.get('latency_before_ms'))}→"
                       f"{_fmt_ms(lp.extra.get('latency_after_ms'))}")
        row.append(lp.skipped or "")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    t = r.totals
    shape = ",".join(map(str, r.input_shape))
    lines.append("")
    lines.append(f"input shape {shape} ({r.input_shape_source}); "
                 f"{t['layers_decomposed']} layers decoupled, {t['layers_skipped']} left as they are")
    lines.append(f"params  {t['params_before']:,} → {t['params_after']:,} "
                 f"({_ratio(t['params_after'], t['params_before'])})")
    lines.append(f"MACs    {t['macs_before']:,} → {t['macs_after']:,} "
                 f"({_ratio(t['macs_after'], t['macs_before'])}); decoupled layers "
                 f"{t['decomposed_macs_before']:,} → {t['decomposed_macs_after']:,} "
                 f"({_ratio(t['decomposed_macs_after'], t['decomposed_macs_before'])})")
    if r.accuracy:
        a = r.accuracy
        lines.append(f"top-1   {a['before']['top1']:.2%} → {a['after']['top1']:.2%} "
                     f"(drop {a['drop_top1']:.2f} points), top-5 {a['before']['top5']:.2%} → "
                     f"{a['after']['top5']:.2%}, on {a.get('images', '?')} images")
    if r.output_error:
        db = r.output_error.get("sqnr_db")
        sqnr = "exact (no difference)" if db is None else f"{db:.2f} dB"
        lines.append(f"output  SQNR {sqnr} of the final outputs on "
                     f"{r.output_error.get('images', '?')} images; out.err = each layer's own "
                     "relative output error, on its input in the original network")
    if r.latency:
        lat = r.latency
        per = "; ms before→after per layer, same batch" if lat.get("per_layer") else ""
        lines.append(f"latency {lat['before_ms']:.2f} ms → {lat['after_ms']:.2f} ms "
                     f"({_speed(lat['speedup'])})"
                     f" at batch {lat.get('batch_size', '?')}, {lat.get('threads', '?')} threads, "
                     f"median of {lat.get('repeats', '?')} interleaved rounds{per}")
        if lat.get("speedup_same_layout") is not None:
            lines.append(f"        the decomposed model computes channels_last; against the original "
                         f"laid out channels_last too ({lat['before_same_layout_ms']:.2f} ms) it is "
                         f"{_speed(lat['speedup_same_layout'])}: that part is decoupling's")
    if r.extra.get("allocation"):
        lines.append(f"ranks   the budget minimised relative output errors measured on "
                     f"{r.extra['allocation']['images']} calibration images (--allocate output)")
    if r.output:
        lines.append(f"wrote   {r.output}")
    return "\n".join(lines)


def _speed(speedup: float) -> str:
    """'1.52x faster' or '1.25x slower' (never '0.80x faster')."""
    if speedup >= 1 or speedup <= 0:
        return f"{speedup:.2f}x faster"
    return f"{1 / speedup:.2f}x slower"


def _ratio(after: float, before: float) -> str:
    if not before:
        return "-"
    x = after / before
    return f"{x:.3f}x, {before / after:.2f}x fewer" if after else f"{x:.3f}x"
