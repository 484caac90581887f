"""Walking a model by fully-qualified name and swapping modules in place."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` was; return the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
