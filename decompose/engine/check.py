"""Nothing broken is handed back: run the changed model and compare it with what it was.

:func:`reference` runs the model once on a seeded random batch before it is changed;
:func:`check` runs it again after (factorizing, folding, forms, calibration) and raises a
one-line :class:`~decompose.errors.DecomposeError` naming the module and the real cause when
it fails to run, changes its output shapes, produces NaN or Inf, or, where the change was meant
to be exact (``--rank full``), differs by more than ``EXACT``. Otherwise it returns the
relative output error, which the report shows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DecomposeError, first_line
from .trace import dtype_device, eval_mode

#: relative output error allowed where a change is exact (float32 rounding through a network)
EXACT = 1e-4


@dataclass
class Reference:
    """The model's outputs on a seeded random batch, before it was changed."""

    x: torch.Tensor
    outputs: list[torch.Tensor]
    structure: str
    #: name -> (input, output) of the layers captured for a per-layer diagnosis
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (tensors, tuples, lists, dicts, dataclasses)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for k in out.__dataclass_fields__ for t in _tensors(getattr(out, k))]
    return []


def _structure(ts: list[torch.Tensor]) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in ts)


def _failing_module(model: nn.Module, tb) -> str | None:
    """The innermost module of ``model`` whose code was running when an exception was raised."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    while tb is not None:
        this = tb.tb_frame.f_locals.get("self")
        if isinstance(this, nn.Module) and id(this) in names:
            found = names[id(this)] or type(model).__name__
            found = f"{found} ({type(this).__name__})"
        tb = tb.tb_next
    return found


def _run(model: nn.Module, x: torch.Tensor, what: str) -> list[torch.Tensor]:
    try:
        with eval_mode(model), torch.no_grad():
            return [t.detach() for t in _tensors(model(x))]
    except DecomposeError:
        raise
    except Exception as e:
        where = _failing_module(model, sys.exc_info()[2])
        at = f" in {where}" if where else ""
        raise DecomposeError(f"the {what} model fails to run{at}: {type(e).__name__}: "
                             f"{first_line(e, 160)}; nothing was written (leave that layer "
                             "out with --exclude, or report the model)") from None


def reference(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2,
              seed: int = 0, capture: tuple[str, ...] = ()) -> Reference | None:
    """The model's outputs on ``batch`` seeded N(0, 1) samples of ``input_shape``; None when the
    model does not run on such input (then nothing can be compared). ``capture``: modules
    whose input and output are kept, to say which layer is wrong if the check fails."""
    dtype, device = dtype_device(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, generator=g).to(dtype=dtype, device=device)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(mod, args, out):
            if name not in layers and args and isinstance(out, torch.Tensor):
                layers[name] = (args[0].detach(), out.detach())
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in capture]
    try:
        outs = _run(model, x, "original")
    except DecomposeError:
        return None
    finally:
        for h in handles:
            h.remove()
    if not outs:
        return None
    return Reference(x, outs, _structure(outs), layers)


def _rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float(w.double().pow(2).sum()) for w in want)
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def _worst_layers(model: nn.Module, ref: Reference) -> list[tuple[str, float]]:
    """Each captured layer's relative error: the changed module on the input the original layer
    received, against what the original layer returned, worst first."""
    out = []
    with torch.no_grad():
        for name, (x, y) in ref.layers.items():
            try:
                m = model.get_submodule(name)
                with eval_mode(m):
                    out.append((name, _rel(_tensors(m(x)), [y])))
            except Exception as e:  # noqa: BLE001 - a layer that cannot run is the worst
                out.append((f"{name} ({type(e).__name__})", float("inf")))
    return sorted(out, key=lambda p: -p[1])


def check(model: nn.Module, ref: Reference | None, *, exact: bool = False,
          what: str = "factorized") -> dict[str, Any] | None:
    """Run ``model`` on the reference batch; raise on a failure (see the module docstring),
    else return ``{"input", "batch", "outputs", "rel_error"}`` for the report."""
    if ref is None:
        return None
    got = _run(model, ref.x, what)
    if _structure(got) != ref.structure:
        raise DecomposeError(f"the {what} model's outputs have shapes {_structure(got)}, the "
                             f"original's {ref.structure}; nothing was written")
    bad = [i for i, t in enumerate(got) if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise DecomposeError(f"the {what} model outputs NaN or Inf on a random batch where the "
                             "original does not; nothing was written (try a higher rank or "
                             "--exclude the layers with the largest kernel error)")
    rel = _rel(got, ref.outputs)
    if exact and rel > EXACT:
        worst = [f"{n} {e:.1e}" for n, e in _worst_layers(model, ref)[:3] if e > EXACT]
        at = f" (layers: {', '.join(worst)})" if worst else ""
        raise DecomposeError(f"at full rank the {what} model differs from the original by "
                             f"{rel:.2e} (more than {EXACT:g}){at}; nothing was written. "
                             "Report the model: a full-rank factorization must be exact")
    return {"input": "random N(0,1)", "batch": int(ref.x.shape[0]), "outputs": ref.structure,
            "rel_error": rel}
