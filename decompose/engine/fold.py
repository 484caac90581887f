"""Folding a BatchNorm into the convolution that feeds it.

In eval mode ``BN(conv(x))`` is a per-output-channel affine map of the conv output::

    s = gamma / sqrt(running_var + eps)                  (gamma = 1, beta = 0 when affine=False)
    BN(conv(x)) = conv'(x)  with  W' = W * s[o],  b' = (b - running_mean) * s + beta

so the BN can be removed (replaced by ``nn.Identity``) after rewriting the conv's weight and bias.
Decoupling the folded kernel approximates exactly what the next layer sees, which is what the
authors of Network Decoupling do (see docs/bn-folding.md for measurements).

Which BNs are folded is decided on the model's ``torch.fx`` graph, never on module names: a BN
is folded only when its one input is the output of a Conv1d/2d/3d and nothing else reads that
output, and when both modules are called exactly once. A BN after anything else, a conv whose
output also feeds a shortcut, a module shared between call sites, a BN without running statistics
(``track_running_stats=False``), and convs or BNs whose class overrides ``forward`` are left alone.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import fx, nn

from ..errors import DecomposeError
from ..methods import conv_prefix, helper_modules
from .surgery import replace_module

_BN = nn.modules.batchnorm._BatchNorm


def _plain_conv(m: nn.Module) -> bool:
    """A Conv1d/2d/3d (subclasses too) whose forward is torch's own, or a known 'same'-padding
    subclass (:func:`decompose.methods.conv_prefix`): W and b enter its output only through the
    convolution, so a BN after it folds into them."""
    return (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and conv_prefix(m)[0]
            and not isinstance(m.weight, nn.parameter.UninitializedParameter))


def _foldable_bn(m: nn.Module) -> bool:
    """A BatchNorm with running statistics whose forward is torch's own."""
    return (isinstance(m, _BN)
            and type(m).forward in (_BN.forward, nn.SyncBatchNorm.forward)
            and m.running_mean is not None and m.running_var is not None
            and not isinstance(m.running_mean, nn.parameter.UninitializedBuffer))


class _Tracer(fx.Tracer):
    """fx's tracer, with plain convs and BNs as leaves even when their class is the user's, and
    factorized layers and the methods' helper modules too (e.g. the dw1 form's channel moves
    branch on the memory layout, which fx cannot trace)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (_plain_conv(m) or _foldable_bn(m) or isinstance(m, helper_modules())
                or super().is_leaf_module(m, qualname))


def _trace(module: nn.Module) -> fx.Graph:
    return _Tracer().trace(module)


def _graphs(model: nn.Module) -> list[tuple[str, fx.Graph]]:
    """The fx graph of ``model``, or, if it does not trace, those of its largest traceable parts.

    Each entry is (prefix, graph); node targets in a graph are relative to the prefix.
    """
    try:
        return [("", _trace(model))]
    except Exception as e:  # symbolic tracing raises many kinds of errors
        first_error = e
    found: list[tuple[str, fx.Graph]] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if not any(True for _ in child.children()):
                continue  # a leaf: nothing inside to fold
            try:
                found.append((fqn, _trace(child)))
            except Exception:
                visit(fqn, child)

    visit("", model)
    if not found:
        msg = str(first_error).strip().splitlines()
        raise DecomposeError(
            f"BatchNorm folding needs a model that torch.fx can trace, and neither "
            f"{type(model).__name__} nor any of its submodules does "
            f"({type(first_error).__name__}: {(msg[0] if msg else '')[:120]}); "
            "make forward free of data-dependent control flow or fold by hand") from None
    warnings.warn(
        f"{type(model).__name__} does not trace with torch.fx "
        f"({type(first_error).__name__}); folding only inside its traceable submodules "
        f"({', '.join(p for p, _ in found[:4])}{', ...' if len(found) > 4 else ''}). A conv or BN "
        "that the untraceable code also calls directly would be folded wrongly.", stacklevel=3)
    return found


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The (conv name, BN name) pairs :func:`fold_batchnorm_` would fold; the model is unchanged.

    Raises:
        DecomposeError: if neither the model nor any submodule can be traced by ``torch.fx``.
    """
    pairs: list[tuple[str, str]] = []
    for prefix, graph in _graphs(model):
        root = model.get_submodule(prefix) if prefix else model
        calls: Counter[int] = Counter()
        for node in graph.nodes:
            if node.op == "call_module":
                calls[id(root.get_submodule(node.target))] += 1
        for node in graph.nodes:
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            bn = root.get_submodule(node.target)
            src = node.args[0]
            if not (_foldable_bn(bn) and isinstance(src, fx.Node) and src.op == "call_module"):
                continue
            conv = root.get_submodule(src.target)
            if not _plain_conv(conv) or conv.out_channels != bn.num_features:
                continue
            if len(src.users) != 1 or calls[id(conv)] != 1 or calls[id(bn)] != 1:
                continue
            pairs.append((_join(prefix, src.target), _join(prefix, node.target)))
    return pairs


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@torch.no_grad()
def fold_into_conv_(conv: nn.Module, bn: nn.Module) -> None:
    """Rewrite ``conv`` so that ``conv(x)`` equals ``bn(conv(x))`` with ``bn`` in eval mode.

    The arithmetic is done in float64 and cast back to the conv's dtype. The conv gets a bias if
    it had none. ``bn`` itself is not changed.
    """
    w = conv.weight
    f64 = dict(dtype=torch.float64, device=w.device)
    var = bn.running_var.to(**f64)
    mean = bn.running_mean.to(**f64)
    gamma = bn.weight.to(**f64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.to(**f64) if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    b = conv.bias.to(**f64) if conv.bias is not None else torch.zeros_like(var)
    new_w = w.to(**f64) * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (b - mean) * scale + beta
    w.copy_(new_w.to(w.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=w.dtype, device=w.device),
                                 requires_grad=w.requires_grad)
    conv.bias.copy_(new_b.to(conv.bias.dtype))


def fold_batchnorm_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that only consumes a conv's output into that conv, in place.

    Each folded conv gets ``W' = W * s``, ``b' = (b - running_mean) * s + beta`` with
    ``s = gamma / sqrt(running_var + eps)`` per output channel, and the BN is replaced by
    ``nn.Identity``. The result equals the original model *in eval mode* (to float rounding); in
    train mode the BNs would have normalised with batch statistics, which a folded model no longer
    does, so fold a model that is done training.

    Which pairs are folded is read from the ``torch.fx`` graph (see the module docstring). If the
    whole model does not trace, its largest traceable submodules are analysed instead and a
    warning names them.

    Args:
        model: any nn.Module; changed in place.

    Returns:
        The (conv name, BN name) pairs folded, in graph order; empty if there was nothing to fold.

    Raises:
        DecomposeError: if neither the model nor any of its submodules traces with ``torch.fx``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
        >>> fold_batchnorm_(net)
        [('0', '1')]
        >>> type(net[1]).__name__, net[0].bias is not None
        ('Identity', True)
    """
    pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        fold_into_conv_(model.get_submodule(conv_name), model.get_submodule(bn_name))
        ident = nn.Identity()
        ident.train(model.get_submodule(bn_name).training)
        replace_module(model, bn_name, ident)
    return pairs


__all__ = ["find_conv_bn_pairs", "fold_batchnorm_", "fold_into_conv_"]
