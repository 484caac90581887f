"""The report: per-layer rows and totals, rendered as a text table or one JSON object.

The JSON schema is documented in docs/report.md. Later stages (accuracy, output error, latency)
add their objects to the same report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

#: LayerPlan fields that are set only by some stages; absent from the JSON while unset.
_OPTIONAL = ("form", "planned_output_error", "plan_ms_before", "plan_ms_after",
             "output_rel_error", "latency_before_ms", "latency_after_ms", "latency_speedup")


@dataclass
class LayerPlan:
    """One convolution: what it was, what it becomes, and what that costs and keeps.

    ``transposed`` marks a ConvTranspose1d/2d/3d (its ``kernel_shape`` is then
    ``(C_in, C_out/groups, *k)``, torch's layout for it).
    ``skipped`` is None for a layer that is factorized, else the reason it is left as it is.
    ``method``/``variant``/``rank`` say how (``variant`` is ND's order, ``"dw-pw"`` or
    ``"pw-dw"``; ``""`` for methods without variants); ``max_rank`` is the method's exact rank.
    ``kernel_error`` is ``||W - W_hat||_F / ||W||_F`` and ``energy`` the kept fraction of
    squared singular values (None for methods without one; 0 and 1 for skipped layers).

    Later stages fill the rest: ``form`` (the layout the layer is built in), the planner's
    timings ``plan_ms_before/after`` and ``planned_output_error`` (``allocation="output"``),
    the measured ``output_rel_error`` and ``latency_before_ms/after_ms/speedup``.
    """

    name: str
    kernel_shape: tuple[int, ...]
    groups: int
    method: str | None = None
    variant: str | None = None
    rank: Any = None
    max_rank: Any = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    kernel_error: float = 0.0
    energy: float | None = 1.0
    skipped: str | None = None
    form: str | None = None
    planned_output_error: float | None = None
    plan_ms_before: float | None = None
    plan_ms_after: float | None = None
    output_rel_error: float | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    latency_speedup: float | None = None
    transposed: bool = False

    #: (candidate, option) the plan was made from, for building it; not part of the JSON.
    choice = None

    @property
    def order(self) -> str | None:
        """ND's order (the variant), kept for the report's ``order`` column."""
        return self.variant

    def take(self, cand: Any, i: int) -> LayerPlan:
        """Record option ``i`` of the candidate ``cand`` (a
        :class:`decompose.methods.base.Candidate`) as this layer's plan."""
        self.method, self.variant = cand.method, cand.variant
        self.rank, self.max_rank = cand.ranks[i], cand.max_rank
        self.macs_after, self.params_after = cand.macs[i], cand.params[i]
        self.kernel_error = cand.errors[i]
        self.energy = cand.energies[i] if cand.energies is not None else None
        self.planned_output_error = (cand.output_errors[i] if cand.output_errors is not None
                                     else None)
        self.skipped = None
        self.choice = (cand, i)
        return self

    def keep(self, reason: str) -> LayerPlan:
        """Turn a planned layer back into a kept original, with the reason."""
        self.method = self.variant = self.rank = self.form = None
        self.macs_after, self.params_after = self.macs_before, self.params_before
        self.kernel_error, self.energy = 0.0, 1.0
        self.planned_output_error = None
        self.skipped = reason
        self.choice = None
        return self

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _OPTIONAL and v is None:
                continue
            d[f.name] = list(v) if isinstance(v, tuple) else v
        d["order"] = self.variant
        return d


@dataclass
class Report:
    """What a plan or a decomposition did: per-layer rows, totals, the config, and what later
    stages measured (accuracy, output error, latency) or did (BN folding, the latency plan,
    output-error allocation, calibration). Every field is typed; ``to_dict`` is the JSON of
    docs/report.md."""

    layers: list[LayerPlan]
    totals: dict[str, Any]
    config: dict[str, Any]
    input_shape: tuple[int, ...]
    input_shape_source: str = "given"
    output: str | None = None
    accuracy: dict[str, Any] | None = None
    output_error: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    folded_bn: list[list[str]] | None = None
    fold: dict[str, Any] | None = None
    baked_parametrizations: dict[str, list[str]] | None = None
    latency_plan: dict[str, Any] | None = None
    allocation: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    already_decomposed: list[Any] | None = None
    output_check: dict[str, Any] | None = None

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
        for key in ("accuracy", "output_error", "latency", "folded_bn", "fold", "latency_plan",
                    "allocation", "calibration", "already_decomposed", "output_check",
                    "baked_parametrizations"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
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


def _rank(r: Any) -> str:
    return "x".join(map(str, r)) if isinstance(r, (tuple, list)) else str(r)


def _num(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_table(r: Report) -> str:
    """A fixed-width per-layer table with totals below (what the CLI prints on stdout)."""
    has_lat = any(lp.latency_before_ms is not None for lp in r.layers)
    has_out = any(lp.output_rel_error is not None for lp in r.layers)
    has_form = any(lp.form is not None for lp in r.layers)
    methods = {lp.method for lp in r.decomposed}
    has_method = bool(methods - {"nd"})
    head = ["layer", "kernel"] + (["method"] if has_method else []) + [
        "order", "rank", "params", "MACs", "kern.err", "energy"]
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
        row = [lp.name, "x".join(map(str, lp.kernel_shape)) + (" T" if lp.transposed else "")]
        if has_method:
            row.append(lp.method or "-")
        row += [
            lp.variant or "-",
            f"{_rank(lp.rank)}/{_rank(lp.max_rank)}" if done else "-",
            f"{_num(lp.params_before)}→{_num(lp.params_after)}",
            f"{_num(lp.macs_before)}→{_num(lp.macs_after)}",
            f"{lp.kernel_error:.4f}" if done else "-",
            f"{lp.energy:.4f}" if done and lp.energy is not None else "-",
        ]
        if has_form:
            row.append(lp.form or "-")
        if has_out:
            v = lp.output_rel_error
            row.append("-" if v is None else f"{v:.4f}")
        if has_lat:
            row.append(f"{_fmt_ms(lp.latency_before_ms)}→{_fmt_ms(lp.latency_after_ms)}")
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
    if r.fold is not None:
        lines.append(_fold_line(r.fold))
    lp_ = r.latency_plan or {}
    if lp_.get("target_latency") is not None and lp_.get("measured_fraction") is not None:
        rounds = ", ".join(f"{f:.3f}" for f in lp_["measured_rounds"])
        verdict = "met" if lp_["met"] else "NOT met (the last, tightest plan tried is kept)"
        lines.append(f"budget  --target-latency {lp_['target_latency']:g} {verdict}: the whole "
                     f"planned model measured {lp_['measured_fraction']:.3f} of the original at "
                     f"batch {lp_['batch_size']} (rounds {rounds}; the per-layer sum predicted "
                     f"{lp_['predicted_fraction']:.3f})")
    if r.output_check:
        c = r.output_check
        lines.append(f"checked the model runs: outputs {c['outputs']} on a random batch of "
                     f"{c['batch']}, relative difference from the original "
                     f"{c['rel_error']:.2e}")
    if r.allocation:
        lines.append(f"ranks   the budget minimised relative output errors measured on "
                     f"{r.allocation['images']} calibration images (--allocate output)")
    if r.baked_parametrizations:
        names = list(r.baked_parametrizations)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"baked   the weight parametrizations (weight_norm, ...) of {len(names)} "
                     f"module(s) into plain weights before saving, exactly: {shown}")
    if r.output:
        lines.append(f"wrote   {r.output}")
    return "\n".join(lines)


def _fold_line(fold: dict[str, Any]) -> str:
    """``--fold-bn``: how many BatchNorms were folded, how, and why the others were not."""
    n, done, left = fold.get("bns", 0), fold.get("folded", []), fold.get("left", {})
    if not n:
        return "BN      --fold-bn: the model has no BatchNorm; nothing folded"
    how = {"fx": "from the torch.fx graph",
           "hooks": "from a forward pass with hooks, each fold checked on a random batch"}
    line = (f"BN      folded {len(done)} of {n} BatchNorms into their convs "
            f"({how.get(fold.get('how'), fold.get('how'))})")
    if left:
        shown = "; ".join(f"{k}: {v}" for k, v in list(left.items())[:3])
        more = f"; and {len(left) - 3} more (see the JSON)" if len(left) > 3 else ""
        line += f"; left {len(left)}: {shown}{more}"
    return line


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
