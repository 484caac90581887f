"""The configs: one frozen dataclass per concern, validated on creation, versioned JSON.

:class:`DecomposeConfig` says how to factor a model (method, rank rule, forms, timing);
:class:`CalibrationConfig` how to refit it on unlabeled images; fine-tuning has
:class:`decompose.recover.finetune.FinetuneConfig`. A CLI run and a script build the same
objects, and a saved model records them, so a decomposed file can always say how it was made
(torchao's config pattern). ``to_dict`` writes ``_type`` and ``_version``; ``from_dict`` reads
any version up to the current one (older dicts without them too) and refuses newer ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import DecomposeError

ORDERS = ("auto", "dw-pw", "pw-dw")
CALIB_METHODS = ("joint", "last")
FORMS = ("plain", "dw1", "auto", "fastest")
RULES = ("rank", "energy", "target_macs", "target_params", "target_latency")
BUDGETS = ("target_macs", "target_params", "target_latency")
ALLOCATIONS = ("kernel", "output")


def versioned(obj: Any) -> dict[str, Any]:
    """A config's fields as a dict, with ``_type`` and ``_version`` first."""
    return {"_type": type(obj).__name__, "_version": obj.VERSION, **dataclasses.asdict(obj)}


def read_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """The fields of ``cls`` in the dict ``d`` (checked with :func:`read_versioned`); an unknown
    key is refused, naming the known ones (``what``: the config's name in the message)."""
    d = read_versioned(cls, d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise DecomposeError(f"unknown {what} keys {sorted(unknown)}; known: {sorted(known)}")
    return d


def read_versioned(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without its ``_type``/``_version`` keys, after checking them (a dict without them
    is version 1 of ``cls``; a newer version or another type is refused)."""
    d = dict(d)
    kind, version = d.pop("_type", cls.__name__), d.pop("_version", 1)
    names = {cls.__name__, *getattr(cls, "ALIASES", ())}
    if kind not in names:
        raise DecomposeError(f"this is a {kind} dict, not a {cls.__name__}; pass it to "
                             f"{kind}.from_dict")
    if not isinstance(version, int) or version > cls.VERSION:
        raise DecomposeError(f"{cls.__name__} version {version!r} is newer than this decompose "
                             f"reads ({cls.VERSION}); upgrade decompose")
    return d


@dataclass(frozen=True)
class DecomposeConfig:
    """How to factor a model's convolutions: which method, which ranks, which forms.

    Exactly one way of choosing ranks may be given; with none, ``rank=1``.

    Args:
        method: a registered method (``decompose.methods.names()``: ``"nd"`` is Network
            Decoupling, Guo et al. 2018), ``"auto"`` (per layer, the method, variant and rank
            with the least summed error under the budget, over every method that takes part
            in auto) or a comma list of methods (auto restricted to those). Several methods need a
            budget (``target_macs``, ``target_params`` or ``target_latency``). Default ``"nd"``.
        rank: keep T terms (the method's rank) per layer (integer >= 1), capped at each layer's
            full rank; ``"full"`` forces the exact rank everywhere, even where it costs more
            than the original (to check that a model is reproduced).
        energy: keep the fewest terms whose squared singular values reach this fraction
            (0 < energy <= 1) of the layer's total, per layer.
        target_macs: global budget: the decomposable layers may cost at most this fraction
            (0 < f < 1) of their original multiply-adds; ranks are spread to minimise the sum of
            squared relative kernel errors (docs/method.md).
        target_params: the same budget on parameters.
        order: ``"dw-pw"`` (depthwise then pointwise, SVD per input channel), ``"pw-dw"``
            (pointwise then depthwise, SVD per output channel) or ``"auto"`` (per layer, see
            docs/method.md for the exact rule). Default ``"auto"``.
        include: glob patterns on fully-qualified module names; when given, only matching convs
            are considered. Default: all.
        exclude: glob patterns of convs to leave alone (e.g. ``("conv1",)``). Default: none.
        input_shape: one sample's shape without the batch dimension (e.g. ``(3, 32, 32)``), used
            to count multiply-adds. Default: inferred (docs/guide.md).
        fold_bn: fold each BatchNorm that only reads a conv's output into that conv before
            decoupling (the BN becomes ``nn.Identity``), so the truncation error is measured in
            the space the next layer sees. Default False (docs/bn-folding.md has the numbers).
        rank_overrides: ``{fqn: T}`` fixed ranks for some layers, whatever the rule.
        target_latency: global latency budget: the whole model, timed on this machine at batch
            ``latency_batch``, may take at most this fraction (0 < f < 1) of the original's
            latency; per-layer (order, rank, form) minimise the sum of squared relative kernel
            errors (docs/speed.md). Implies timing every option.
        form: how a decoupled layer is built (docs/speed.md): ``"plain"`` (conv_dw with channel
            multiplier T, conv_pw; default), ``"dw1"`` (channel multiplier 1 via a channel
            repeat / grouped sum; fast on wide layers), ``"auto"`` (the cost-model rule of
            :func:`decompose.methods.nd.forms.auto_form`), ``"fastest"`` (time the forms of each layer and
            build the fastest). A layer whose best form would be the dense conv is kept original.
        latency_aware: time every decoupled layer against its original conv on the input it
            receives (random input of ``input_shape`` at batch ``latency_batch``) and keep the
            original where decoupling is not faster by ``latency_margin``.
        latency_batch: batch size of the planner's timing input (default 1).
        threads: torch threads while the planner times (default: as set).
        latency_margin: a decoupled layer must be at least this many times faster than the
            original to be kept by a timing planner (default 1.05: timing noise).
        allocation: what the budgets (``target_macs``, ``target_params``, ``target_latency``)
            minimise: ``"kernel"`` (summed squared relative kernel errors, no data; default) or
            ``"output"`` (summed squared relative *output* errors measured on calibration
            images, :mod:`decompose.sensitivity`; needs them: ``compress_(...,
            calibration=...)`` or ``--calibrate DIR``).
        channels_last: lay the model's 4-D (5-D) weights out channels_last (channels_last_3d)
            before planning, and keep the decoupled model so: PyTorch then runs every conv in
            that layout even on a contiguous NCHW input, which is what makes depthwise convs
            fast on CPU (docs/layouts.md). The planner times in this layout. Default False.
    """

    rank: int | str | None = None
    energy: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    order: str = "auto"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    input_shape: tuple[int, ...] | None = None
    fold_bn: bool = False
    rank_overrides: dict[str, int] = field(default_factory=dict)
    target_latency: float | None = None
    form: str = "plain"
    latency_aware: bool = False
    latency_batch: int = 1
    threads: int | None = None
    latency_margin: float = 1.05
    channels_last: bool = False
    allocation: str = "kernel"
    method: str = "nd"
    seed: int = 0

    VERSION = 2
    ALIASES = ("DecoupleConfig",)

    def __post_init__(self) -> None:
        chosen = [n for n in RULES if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise DecomposeError(
                "choose one of --rank, --energy, --target-macs, --target-params, "
                f"--target-latency (got {', '.join(chosen)})")
        if not chosen:
            object.__setattr__(self, "rank", 1)
        if self.rank is not None and self.rank != "full":
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise DecomposeError(f"rank must be an integer >= 1 or 'full', got {self.rank!r}; "
                                     "try --rank 1")
        if self.energy is not None:
            e = self.energy
            if not isinstance(e, (int, float)) or not (0 < e <= 1):
                raise DecomposeError(f"energy must be in (0, 1], got {e!r}; try --energy 0.9")
        for name in ("target_macs", "target_params", "target_latency"):
            f = getattr(self, name)
            if f is not None and (not isinstance(f, (int, float)) or not (0 < f < 1)):
                flag = "--" + name.replace("_", "-")
                raise DecomposeError(f"{name} must be in (0, 1), got {f!r}; try {flag} 0.5")
        if self.order not in ORDERS:
            raise DecomposeError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.form not in FORMS:
            raise DecomposeError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}; "
                                 "try --form auto")
        for name in ("latency_batch", "threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise DecomposeError(f"{name} must be an integer >= 1, got {v!r}")
        if self.latency_batch is None:
            raise DecomposeError("latency_batch must be an integer >= 1, got None")
        m = self.latency_margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (1 <= m < 10):
            raise DecomposeError(f"latency_margin must be a number in [1, 10), got {m!r}; try 1.05")
        if self.allocation not in ALLOCATIONS:
            raise DecomposeError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got "
                                 f"{self.allocation!r}; try --allocate output")
        if self.allocation == "output" and self.selection not in BUDGETS:
            raise DecomposeError("allocation 'output' spreads a budget: use it with "
                                 "--target-macs, --target-params or --target-latency")
        if not isinstance(self.channels_last, bool):
            raise DecomposeError(f"channels_last must be True or False, got {self.channels_last!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.input_shape is not None:
            shape = tuple(int(s) for s in self.input_shape)
            if not shape or any(s < 1 for s in shape):
                raise DecomposeError(f"input shape must be positive integers like 3,32,32, got {self.input_shape!r}")
            object.__setattr__(self, "input_shape", shape)
        for k, v in dict(self.rank_overrides).items():
            if v != "full" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise DecomposeError(f"rank override for {k} must be an integer >= 1, got {v!r}")
        if not isinstance(self.method, str):
            raise DecomposeError(f"method must be a name like 'nd', got {self.method!r}")
        from .methods import get, resolve
        chosen = resolve(self.method)
        object.__setattr__(self, "method", ",".join(chosen) if "," in self.method else
                           self.method.strip())
        if len(chosen) > 1 and self.selection not in BUDGETS:
            raise DecomposeError(f"--method {self.method} chooses among methods under a budget: "
                                 "give --target-macs, --target-params or --target-latency "
                                 "(e.g. --target-macs 0.5)")
        if self.energy is not None:
            lacking = [n for n in chosen if not get(n).has_energy]
            if lacking:
                raise DecomposeError(f"--energy needs singular values, which {', '.join(lacking)} "
                                     "does not have; use --rank or a budget such as "
                                     "--target-macs 0.5")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DecomposeError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def selection(self) -> str:
        """Which rank rule is active: 'rank', 'energy', 'target_macs', 'target_params' or
        'target_latency'."""
        for n in RULES:
            if getattr(self, n) is not None:
                return n
        return "rank"  # pragma: no cover - __post_init__ sets rank

    @property
    def methods(self) -> tuple[str, ...]:
        """The registered methods this config draws on."""
        from .methods import resolve
        return resolve(self.method)

    @property
    def timed(self) -> bool:
        """Whether planning times layers on this machine."""
        return self.latency_aware or self.form == "fastest" or self.target_latency is not None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["include"] = list(self.include)
        d["exclude"] = list(self.exclude)
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        return {**versioned(self), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecomposeConfig:
        d = read_fields(cls, d, "config")
        if d.get("input_shape") is not None:
            d["input_shape"] = tuple(d["input_shape"])
        d["include"] = tuple(d.get("include") or ())
        d["exclude"] = tuple(d.get("exclude") or ())
        return cls(**d)


#: The name this config had before other methods joined Network Decoupling.
DecoupleConfig = DecomposeConfig


@dataclass(frozen=True)
class CalibrationConfig:
    """How to refit factorized layers to the original's outputs on unlabeled images.

    Args:
        samples: use at most this many images. Default 512.
        method: ``"joint"`` fits every factor of each layer (the method's own solve, or the
            generic least-squares fit of the composed kernel); ``"last"`` only the conv that
            produces the output. Default ``"joint"``.
        ridge: regularisation of every least-squares solve, relative to the mean diagonal of
            its normal matrix, pulling towards the current weights (>= 0). Default 1e-4.
        iterations: alternating rounds of a joint fit after the first solve. Default 1.
        add_bias: give layers without a bias one (fitted too). Default False.
        pixels_per_image: a seeded random subset of at most this many output pixels per image
            in each layer's statistics (None: all). Default 256.
        cache_mb: memory for paused forward passes. Default 1024.
        seed: seed of the pixel subsets. Default 0.
        allocation_samples: with ``allocation="output"``, the budget's output errors are
            measured on the first this many images. Default 128.
    """

    samples: int = 512
    method: str = "joint"
    ridge: float = 1e-4
    iterations: int = 1
    add_bias: bool = False
    pixels_per_image: int | None = 256
    cache_mb: float = 1024
    seed: int = 0
    allocation_samples: int = 128

    VERSION = 1

    def __post_init__(self) -> None:
        def positive_int(name: str, v: Any, allow_none: bool = False, minimum: int = 1) -> None:
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise DecomposeError(f"{name} must be an integer >= {minimum}, got {v!r}")
        positive_int("samples", self.samples)
        positive_int("iterations", self.iterations, minimum=0)
        positive_int("pixels_per_image", self.pixels_per_image, allow_none=True)
        positive_int("seed", self.seed, minimum=0)
        positive_int("allocation_samples", self.allocation_samples)
        if self.method not in CALIB_METHODS:
            raise DecomposeError(f"calibration method must be one of {', '.join(CALIB_METHODS)}, "
                                 f"got {self.method!r}; try --calib-method joint")
        for name in ("ridge", "cache_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise DecomposeError(f"{name} must be a number >= 0, got {v!r}")
        if not isinstance(self.add_bias, bool):
            raise DecomposeError(f"add_bias must be True or False, got {self.add_bias!r}")

    def to_dict(self) -> dict[str, Any]:
        return versioned(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationConfig:
        return cls(**read_fields(cls, d, "calibration config"))
