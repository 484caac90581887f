"""The registry of factorization methods: name -> :class:`~decompose.methods.base.Method`.

Built-in methods register themselves when :mod:`decompose.methods` is imported, exactly as a
user's would::

    from decompose.methods import Method, register

    @register
    class MyMethod(Method):
        name = "mine"
        ...

``decompose MODEL --method mine`` and ``DecomposeConfig(method="mine")`` then use it.
"""

from __future__ import annotations

from .base import Method

_METHODS: dict[str, Method] = {}

#: What ``method="auto"`` means: every registered method with ``in_auto``.
AUTO = "auto"


def register(method: type[Method] | Method) -> type[Method] | Method:
    """Register a method (a :class:`Method` subclass, instantiated here, or an instance) under
    its ``name``; usable as a class decorator. A name registered twice replaces the first."""
    inst = method() if isinstance(method, type) else method
    if not isinstance(inst, Method) or not inst.name or inst.name == AUTO or "," in inst.name:
        raise ValueError(f"a method needs a name other than {AUTO!r} and without commas, got "
                         f"{getattr(inst, 'name', None)!r}")
    _METHODS[inst.name] = inst
    return method


def get(name: str) -> Method:
    """The method registered as ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        from ..errors import DecomposeError
        raise DecomposeError(f"unknown method {name!r}; choose one of {', '.join(names())} or "
                             f"{AUTO}") from None


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_METHODS)


def resolve(spec: str) -> tuple[str, ...]:
    """The methods a ``--method`` value stands for: one name, ``auto`` (every method that takes
    part in auto), or a comma list (auto restricted to those)."""
    from ..errors import DecomposeError
    spec = spec.strip()
    if spec == AUTO:
        return tuple(n for n, m in _METHODS.items() if m.in_auto)
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise DecomposeError(f"no method in {spec!r}; choose from {', '.join(names())} or {AUTO}")
    for p in parts:
        get(p)
    if len(set(parts)) != len(parts):
        raise DecomposeError(f"method {spec!r} names a method twice")
    return tuple(parts)
