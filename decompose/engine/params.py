"""Parametrized weights (``weight_norm`` and friends): found, and baked into plain weights.

Audio models (Wav2Vec2's positional conv, Encodec, HiFi-GAN style vocoders) compute conv
weights from other parameters, with ``torch.nn.utils.parametrizations.weight_norm`` (a
``parametrize`` module: the conv's class becomes ``ParametrizedConv1d``) or the older
``torch.nn.utils.weight_norm`` (a forward pre-hook that recomputes ``weight`` before every
call). Both give the conv an *effective* ``weight``, which is what decompose factors. Neither
can be saved as a whole module: torch refuses to pickle a parametrized module, and the old
hook is a class the weights-only loader does not know.

:func:`bake_parametrizations_` replaces every parametrization by a plain ``weight`` parameter
holding the effective weight (``remove_parametrizations(..., leave_parametrized=True)``,
``remove_weight_norm``, ``remove_spectral_norm``): the model computes exactly what it computed
before (in eval mode), but the reparametrization is gone, as in any exported model.
:func:`decompose.api.save` does it before writing and the report says which modules.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

#: the old hook-based reparametrizations, by class name: how to remove each
_OLD_HOOKS = ("WeightNorm", "SpectralNorm")


def _old_hooks(m: nn.Module) -> list:
    return [h for h in m._forward_pre_hooks.values() if type(h).__name__ in _OLD_HOOKS]


def parametrized(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the parametrizations on it (e.g. ``["weight_norm(weight)"]``), for every
    module whose tensors are computed from others."""
    out: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        kinds: list[str] = []
        if parametrize.is_parametrized(m):
            for tensor, plist in m.parametrizations.items():
                what = "+".join(_kind(p) for p in plist)
                kinds.append(f"{what}({tensor})")
        for h in _old_hooks(m):
            kinds.append(f"{'weight_norm' if type(h).__name__ == 'WeightNorm' else 'spectral_norm'}"
                         f"({h.name}, old hook)")
        if kinds:
            out[name] = kinds
    return out


def _kind(p: nn.Module) -> str:
    name = type(p).__name__
    return {"_WeightNorm": "weight_norm", "_SpectralNorm": "spectral_norm",
            "_Orthogonal": "orthogonal"}.get(name, name)


def bake_parametrizations_(model: nn.Module) -> dict[str, list[str]]:
    """Replace every parametrization of ``model`` by a plain parameter holding its current
    value, in place; returns what was baked (as :func:`parametrized`). Exact: the model's
    outputs (eval mode) are the same numbers before and after."""
    found = parametrized(model)
    for name in found:
        m = model.get_submodule(name)
        if parametrize.is_parametrized(m):
            _own_class(m)
            for tensor in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, tensor, leave_parametrized=True)
            _drop_compat_hooks(m)
        for h in _old_hooks(m):
            with torch.no_grad():
                if type(h).__name__ == "WeightNorm":
                    torch.nn.utils.remove_weight_norm(m, h.name)
                else:
                    torch.nn.utils.remove_spectral_norm(m, h.name)
    return found


def _own_class(m: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations are removed.

    ``parametrize`` makes one ``Parametrized<Cls>`` class per module, but ``copy.deepcopy``
    gives the copy the *same* class, and ``remove_parametrizations`` deletes the tensor's
    property from the class: baking a copy (``decompose.save(copy.deepcopy(model))``) would take
    ``weight`` away from the original too, which then fails to run."""
    cls = type(m)
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    m.__class__ = type(cls.__name__, cls.__bases__, body)


def _drop_compat_hooks(m: nn.Module) -> None:
    """``parametrizations.weight_norm`` also registers a local function that translates old
    ``weight_g``/``weight_v`` state-dict keys when loading; it cannot be pickled, and a baked
    module has neither key nor parametrization left to translate to."""
    for key, h in list(m._load_state_dict_pre_hooks.items()):
        fn = getattr(h, "hook", h)
        if getattr(fn, "__qualname__", "").startswith("weight_norm.<locals>"):
            del m._load_state_dict_pre_hooks[key]


def detach_hook_weights_(model: nn.Module) -> int:
    """Recompute, without autograd history, the ``weight`` that an old-style ``weight_norm`` or
    ``spectral_norm`` hook keeps on its module (the hook recomputes it before every call
    anyway). A weight with history makes ``copy.deepcopy`` of the model fail; returns how many
    were refreshed."""
    n = 0
    for m in model.modules():
        for h in _old_hooks(m):
            with torch.no_grad():
                if type(h).__name__ == "WeightNorm":
                    w = h.compute_weight(m)
                else:
                    w = h.compute_weight(m, do_power_iteration=False)
            setattr(m, h.name, w)
            n += 1
    return n


__all__ = ["bake_parametrizations_", "detach_hook_weights_", "parametrized"]
