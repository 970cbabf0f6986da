"""The five interfaces every component implements, and the method recipe.

Shapes follow PEFT: the base weight, seen as a matrix, is W (m, n) = (out, in);
two-factor adapters hold B (m, r) and A (r, n) with ΔW = s·B·A; three-factor
adapters hold U (m, r), S (r, r), V (n, r) with ΔW = s·U·S·Vᵀ.

Manifolds are batched: every tensor argument is (..., n, p) so that all
same-shape factors of a model are handled in one call. A coupled manifold
(e.g. balanced pairs) takes and returns tuples of such tensors.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import ConfigError, ShapeError
from .layers import LayerOps, LinearOps, layer_ops

FactorKey = str
"""A factor name ('A'), or comma-joined names for a coupled manifold ('B,A')."""


def factor_names_of(key: FactorKey) -> tuple[str, ...]:
    """('B', 'A') for 'B,A'; ('A',) for 'A'."""
    return tuple(part.strip() for part in key.split(","))


# --------------------------------------------------------------------------- Manifold
class Manifold(abc.ABC):
    """The geometry of one factor, or of a tuple of factors (`coupled = True`).

    All methods are batched over leading dims: x, u, v are (..., n, p).
    Geometry runs in float32 or float64: the optimizer stacks parameters with
    `geopeft.kernels.stack_fp32`, whatever their dtype.
    """

    name: ClassVar[str] = ""
    #: True for the flat space: the optimizer skips every geometric stage.
    is_euclidean: ClassVar[bool] = False
    #: True when the manifold couples several factors (x is a tuple of tensors). Its
    #: `project` must keep the product of the factors in key order (BA for "B,A"): the
    #: adapter's function; the property tests check it.
    coupled: ClassVar[bool] = False
    #: How the optimizer restores feasibility after the base step: "retract" moves
    #: from the old point along the projected step; "project" maps the new point.
    post_step: ClassVar[str] = "retract"
    POST_STEPS: ClassVar[tuple[str, ...]] = ("retract", "project")
    #: True when M is a cone (c·x ∈ M for x ∈ M, c > 0): weight decay keeps factors on M,
    #: so the optimizer leaves their weight decay as the param groups say.
    scale_invariant: ClassVar[bool] = False

    @abc.abstractmethod
    def project_tangent(self, x: Tensor, u: Tensor) -> Tensor:
        """Orthogonal projection of the ambient vector u onto T_x M; (..., n, p)."""

    def egrad_to_rgrad(self, x: Tensor, g: Tensor) -> Tensor:
        """Riemannian gradient from the Euclidean gradient g; (..., n, p)."""
        return self.project_tangent(x, g)

    @abc.abstractmethod
    def retract(self, x: Tensor, u: Tensor) -> Tensor:
        """A point of M near x + u for a tangent u at x; (..., n, p)."""

    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Move tangent v at x to the tangent space at y (projection transport)."""
        return self.project_tangent(y, v)

    def retract_step(self, x: Tensor, new: Tensor) -> Tensor:
        """The point after the base optimizer moved x to `new` (off the manifold): by
        default retract(x, project_tangent(x, new − x)), factor by factor for a coupled
        manifold's tuples. Override to change the step (StelLA scales it) or to fuse the
        two into one faster kernel."""
        if self.coupled:
            return self.retract(x, self.project_tangent(x, tuple(n - o for n, o in zip(new, x))))
        return self.retract(x, self.project_tangent(x, new - x))

    @abc.abstractmethod
    def project(self, x: Tensor) -> Tensor:
        """The nearest point of M to x (or a cheap feasible point that fixes x when x ∈ M)."""

    @abc.abstractmethod
    def violation(self, x: Tensor) -> Tensor:
        """How far x is from M, per batch entry: shape x.shape[:-2]. 0 on M."""

    def initial_violation(self, x: Tensor) -> Tensor:
        """`violation` of a starting point (after `project`): `adapt` refuses a factor above
        its dtype's tolerance (√ε). Default: `violation(x)`. A manifold whose `project`
        leaves some points off M by design gives 0 for them (BaLoRA: pairs with
        rank(BA) < r, balanced once BA has full rank)."""
        return self.violation(x)

    @abc.abstractmethod
    def random_point(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """A random point of M of the given (..., n, p) shape (a coupled manifold: a tuple
        of shapes, one per factor, and a tuple of tensors back)."""

    def shape_problem(self, shape: tuple[int, ...] | tuple[tuple[int, ...], ...]) -> str | None:
        """None when factors of `shape` — (n, p), or one shape per factor for a coupled
        manifold — can lie on M; else what M needs, as a phrase ("stiefel needs …").
        `adapt` refuses a factor that does not fit with it. Default: any shape fits."""
        return None

    def options(self) -> dict[str, Any]:
        """The constructor options, for saving a recipe as JSON."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


# --------------------------------------------------------------------------- Adapter
#: base weight dtypes whose adapters default to float32 factors (PEFT's autocast_adapter_dtype)
HALF_DTYPES = (torch.float16, torch.bfloat16)
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def factor_dtype_for(base_dtype: torch.dtype, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype of an adapter's factors: `dtype` if given (a torch.dtype or its name),
    else float32 on a float16/bfloat16 base (half-precision factors overflow or lose the
    step under Adam), else the base weight's dtype."""
    if dtype is None:
        return torch.float32 if base_dtype in HALF_DTYPES else base_dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in FACTOR_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a floating dtype for factors; use one of "
                         f"{', '.join(str(d).removeprefix('torch.') for d in FACTOR_DTYPES)}")
    return dtype


def check_rank(rank: Any, what: str = "rank") -> None:
    """ValueError unless `rank` is a positive int (True is not a rank)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{what} must be a positive int, got {rank!r} ({type(rank).__name__})")


def check_alpha(alpha: Any) -> None:
    """ValueError unless `alpha` is None (meaning: the rank) or a positive finite number."""
    if alpha is None:
        return
    if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha must be a positive finite number (scaling = alpha/rank), got "
                         f"{alpha!r}")


class Adapter(nn.Module, abc.ABC):
    """A low-rank update attached to one base layer.

    Subclasses declare `factor_names` and `rank_dims` (which dims of each factor
    have size `rank`), create their factors as `nn.Parameter`s under those names
    and implement the abstract methods. The base layer is referenced, not
    registered: the adapter's state_dict holds only its factors.
    """

    factor_names: ClassVar[tuple[str, ...]] = ()
    rank_dims: ClassVar[Mapping[str, tuple[int, ...]]] = {}
    #: factor -> default manifold name; the recipe may override any entry.
    default_manifolds: ClassVar[Mapping[FactorKey, str]] = {}

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None,
                 rslora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        ops = layer_ops(base)
        if ops is None:
            raise TypeError(f"cannot attach an adapter to {type(base).__name__}")
        check_rank(rank)
        check_alpha(alpha)
        self.ops: LayerOps = ops
        self._base = (base,)  # a reference, not a submodule
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.rslora = bool(rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.factor_dtype = factor_dtype_for(ops.weight_dtype(base), dtype)
        # on the base weight's device, meta included: `to_empty` / `geopeft.load` materialise them
        self.factor_device = base.weight.device
        self._manifolds: dict[FactorKey, Manifold] = {}

    def in_input_dtype(self, x: Tensor, *factors: Tensor) -> tuple[Tensor, ...]:
        """`factors` cast to x's dtype when x is floating point, so the forward computes in
        the input's dtype (float32 factors of a float16 model run as float16, as under
        autocast; gradients reach the float32 factors through the cast)."""
        if not x.is_floating_point():
            return factors
        return tuple(f if f.dtype == x.dtype else f.to(x.dtype) for f in factors)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """Every parameter an adapter holds is stored contiguous, however it was made (a
        QR factor is column-major) or assigned (`self.U = ...`, `resize`, `load`): a resume
        or reload is bitwise only if the factors have the trained run's layout, since BLAS
        may round a transposed operand differently. The Parameter keeps its identity (its
        `.data` is replaced by a contiguous copy); sharded (DTensor) parameters are left
        alone."""
        if param is not None and type(param.data) is Tensor and not param.is_contiguous():
            param.data = param.data.contiguous()
        super().register_parameter(name, param)

    # -- what the base layer is
    @property
    def base_layer(self) -> nn.Module:
        return self._base[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the base weight's matrix view."""
        return (self.ops.m, self.ops.n)

    def base_weight(self) -> Tensor:
        """The base weight as an (m, n) matrix."""
        return self.ops.weight_matrix(self.base_layer)

    # -- the contract
    def factors(self) -> dict[str, nn.Parameter]:
        """The trainable factors by name, in `factor_names` order."""
        return {name: getattr(self, name) for name in self.factor_names}

    @abc.abstractmethod
    def delta_weight(self) -> Tensor:
        """ΔW in the base weight's own shape and layout."""

    @abc.abstractmethod
    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        """base_out plus the adapter's contribution, without forming ΔW."""

    def fused_forward(self, x: Tensor) -> Tensor | None:
        """The base layer's output plus the adapter's, computed in one fused function
        (base and update together, e.g. `geopeft.kernels.lora_linear`), or None when this
        adapter or this call has no fused path; then `AdaptedLayer` runs the base layer and
        `forward`. The default has none."""
        return None

    def can_fuse_linear(self, x: Tensor) -> bool:
        """Whether base(x) + update may run as one `geopeft.kernels.lora_linear`: a plain
        nn.Linear base without hooks, floating x in its weight's dtype, no dropout active
        (`dropout_p` while training) and no autocast."""
        base = self.base_layer
        return (type(self.ops) is LinearOps and type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
                and not (self.training and getattr(self, "dropout_p", 0.0) > 0)
                and x.is_floating_point() and x.dtype == base.weight.dtype
                and not torch.is_autocast_enabled(x.device.type))

    @abc.abstractmethod
    def to_lora(self) -> tuple[Tensor, Tensor]:
        """(B (m, r), A (r, n)) with `scaling * B @ A` equal to ΔW as an (m, n) matrix."""

    @torch.no_grad()
    def resize(self, new_rank: int, keep: Tensor | None = None, *,
               basis: Mapping[str, Sequence[Tensor]] | None = None,
               values: Mapping[str, Tensor] | None = None) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Change the rank, keeping the rank-indices `keep` (default: the leading ones)
        and zero-filling new ones — or, with `basis`, mapping each factor along its rank
        dims by a change of basis ({factor: one (rank, new_rank) matrix per rank dim, in
        `rank_dims` order}); `values` ({factor: tensor}) gives new factors outright (a rank
        controller that computed them batched). Each factor becomes a new Parameter (autograd
        caches a leaf's shape, so a leaf cannot change shape in place); returns
        {factor: (old, new)} so an optimizer can follow — `GeometricOptimizer.resize` does.
        `scaling` does not change: a rank change must not rescale the output."""
        from geopeft.kernels import change_basis, resize_along

        check_rank(new_rank, "new rank")
        if keep is not None:
            keep = torch.as_tensor(keep)
            if (keep.dim() != 1 or keep.is_floating_point() or len(keep) > new_rank
                    or (len(keep) and (int(keep.min()) < 0 or int(keep.max()) >= self.rank))
                    or len(torch.unique(keep)) != len(keep)):
                raise ShapeError(f"keep must be distinct rank indices in [0, {self.rank}), at most "
                                 f"{new_rank} of them (the new rank); got {keep.tolist()}")
        new_values = {}
        for name, old in self.factors().items():
            dims = self.rank_dims[name]
            shape = [new_rank if d in dims else s for d, s in enumerate(old.shape)]
            if values is not None and name in values:
                value = values[name].detach()
            elif basis is not None and name in basis:
                mats = basis[name]
                if len(mats) != len(dims) or any(tuple(b.shape) != (self.rank, new_rank) for b in mats):
                    raise ShapeError(f"basis for factor {name!r} must be {len(dims)} matri(ces) of shape "
                                     f"({self.rank}, {new_rank}), got {[tuple(b.shape) for b in mats]}")
                value = change_basis(old.detach()[None], dims, [b[None] for b in mats])[0]
            else:
                value = resize_along(old.detach(), dims, new_rank, keep)
            if list(value.shape) != shape:
                raise ShapeError(f"new value of factor {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(shape)} for rank {new_rank}")
            new_values[name] = value.to(dtype=old.dtype, device=old.device).contiguous()
        swapped = {}
        for name, old in self.factors().items():
            new = nn.Parameter(new_values[name], requires_grad=old.requires_grad)
            setattr(self, name, new)
            swapped[name] = (old, new)
        self.rank = new_rank
        return swapped

    def factor_manifolds(self) -> dict[FactorKey, Manifold]:
        """Which manifold each factor (or tuple of factors) lives on."""
        return dict(self._manifolds)

    def set_manifolds(self, manifolds: Mapping[FactorKey, Manifold]) -> None:
        """Used by `adapt`: attach the recipe's resolved manifolds."""
        self._manifolds = dict(manifolds)

    def options(self) -> dict[str, Any]:
        """Constructor options besides the base layer and rank, as JSON values."""
        return {"alpha": self.alpha, "rslora": self.rslora}

    def extra_repr(self) -> str:
        """'linear 16x16, rank=4, scaling=2, rslora, U, V: stiefel; S: euclidean'."""
        m, n = self.shape
        parts = [f"{self.ops.kind} {m}x{n}", f"rank={self.rank}", f"scaling={self.scaling:.4g}"]
        parts += [f"{k}={v}" for k, v in self.options().items() if k not in ("alpha", "rslora") and v]
        if self.rslora:
            parts.append("rslora")
        by_manifold: dict[str, list[str]] = {}
        for key, manifold in self._manifolds.items():
            label = manifold.name or type(manifold).__name__
            by_manifold.setdefault(label, []).append(f"({key})" if "," in key else key)
        if by_manifold:
            parts.append("; ".join(f"{', '.join(keys)}: {label}" for label, keys in by_manifold.items()))
        return ", ".join(parts)


# --------------------------------------------------------------------------- GradientTransform
class GradientTransform(abc.ABC):
    """Rewrites one adapter's factor gradients before the base optimizer step.

    Chained in recipe order, like optax. `requires` names the factors it needs;
    adapt() refuses an adapter that lacks one, naming both components.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    #: A family of transforms that must not be chained with each other: a recipe with two of
    #: one family is refused. "gram_preconditioner": a factor's gradient divided by the other
    #: factor's Gram matrix (LoRA-Pro, scaled GD) — chained, it is divided twice and the step
    #: blows up as B → 0; its outputs are preconditioned steps, not gradients, so
    #: moments="transport" through a coupled projection's change of basis is refused with
    #: it. "" (default): chains with anything.
    exclusive: ClassVar[str] = ""

    def init_state(self, adapter: Adapter) -> dict[str, Tensor]:
        """Per-adapter state (tensors only, so it round-trips through state_dict)."""
        return {}

    @abc.abstractmethod
    def transform(self, adapter: Adapter, grads: dict[str, Tensor],
                  state: dict[str, Tensor]) -> dict[str, Tensor]:
        """New gradients by factor name (same shapes); may update `state` in place.
        `grads` hold whole tensors; read factors as `geopeft.kernels.full(adapter.A)`,
        which is `adapter.A` itself unless the model is sharded (FSDP2)."""

    def transform_group(self, adapters: Sequence[Adapter], grads: Sequence[dict[str, Tensor]],
                        states: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Same-shape adapters at once. Override to batch; the default loops."""
        return [self.transform(a, g, s) for a, g, s in zip(adapters, grads, states)]

    @property
    def takes_own_step(self) -> bool:
        """True when the gradients this transform returns are the step itself (e.g. it
        keeps its own Adam moments): the optimizer then applies p ← p − lr·g to the
        adapters' factors, lr of each factor's param group (so LR schedulers act), and
        the inner optimizer steps only the other parameters (a `trainable=` head gets the
        update the user asked for). Default False."""
        return False

    def check_optimizer(self, optimizer: torch.optim.Optimizer, adapters: Sequence[Adapter]) -> None:  # noqa: B027
        """Called once when `geopeft.optimizer` wraps `optimizer` (the inner one): raise a
        `ConfigError` if it cannot carry out this transform's gradients. Default: any
        optimizer works."""

    def options(self) -> dict[str, Any]:
        return {}


# --------------------------------------------------------------------------- RankController
class RankController(abc.ABC):
    """Decides ranks during training; the optimizer calls it after every step."""

    name: ClassVar[str] = ""
    #: True when it never changes a rank: the optimizer does not call it.
    static: ClassVar[bool] = False
    #: factors it needs of the adapter; adapt() refuses an adapter that lacks one.
    requires: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def step(self, step: int, adapters: Sequence[tuple[str, Adapter]],
             optimizer: Any) -> dict[str, int] | None:
        """Apply rank changes (through `optimizer.resize` / `resize_many`); return
        {module name: new rank}. `step` counts the optimizer steps taken, this one included.
        `adapters` are this controller's adapter's layers only; where several adapters train
        together, `optimizer` is a view whose `resize` / `resize_many` address them."""

    def before_step(self, step: int, adapters: Sequence[tuple[str, Adapter]],  # noqa: B027
                    optimizer: Any) -> None:
        """Called before the gradient transforms, with the gradients of the user's backward
        pass as they are (`step`: the steps taken before this one). A controller that needs
        the raw gradients reads them here; one that moves some factors itself clears their
        gradients (`p.grad = None`): the base optimizer and the geometric stages then leave
        those factors alone. Default: nothing."""

    def check_optimizer(self, optimizer: torch.optim.Optimizer,  # noqa: B027
                        adapters: Sequence[tuple[str, Adapter]]) -> None:
        """Called once when `geopeft.optimizer` wraps `optimizer` (the inner one): raise a
        `ConfigError` for adapters or an optimizer it cannot work with. Default: any."""

    def initial_rank(self, rank: int) -> int:
        """The rank `adapt(..., rank=rank)` builds each adapter at (layers without a
        per-layer `ranks=` entry). Default: `rank`; a controller that prunes down to the
        requested rank (AdaLoRA) may start above it."""
        return rank

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    def options(self) -> dict[str, Any]:
        return {}


@dataclass
class RankChange:
    """One layer's rank change for `GeometricOptimizer.resize_many`: the module name, the
    new rank, and how the rank space maps (see `Adapter.resize`): kept indices `keep`, or
    a change of `basis` ({factor: one (rank, new rank) matrix per rank dim}); `values`
    optionally gives the new factors outright. `new_second_moments` ({factor: policy}) says
    how the optimizer's second moments (`exp_avg_sq`, …) of a factor's *new* coordinates
    start — those no old direction maps to (a zero column of the basis map, a padded index):
    at 0 by default, or "mean": the mean of the entries at old coordinates, so that Adam
    steps a new entry by its gradient relative to the old ones', not by a full normalised
    step whatever its gradient (its step count carries on)."""

    name: str
    rank: int
    keep: Tensor | None = None
    basis: Mapping[str, Sequence[Tensor]] | None = None
    values: Mapping[str, Tensor] | None = None
    new_second_moments: Mapping[str, str] | None = None

    SECOND_MOMENT_POLICIES: ClassVar[tuple[str, ...]] = ("zero", "mean")

    def __post_init__(self) -> None:
        bad = {f: p for f, p in (self.new_second_moments or {}).items()
               if p not in self.SECOND_MOMENT_POLICIES}
        if bad:
            raise ConfigError(f"RankChange for {self.name!r}: new_second_moments {bad} names an unknown "
                              f"policy; use one of {', '.join(self.SECOND_MOMENT_POLICIES)}")


# --------------------------------------------------------------------------- Initializer
class Initializer(abc.ABC):
    """Sets the factors before training, data-free or from calibration batches."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    #: True when it needs `model`, `batches` and `loss_fn`.
    needs_data: ClassVar[bool] = False

    @abc.abstractmethod
    def initialize(self, adapters: Sequence[tuple[str, Adapter]], model: nn.Module | None = None,
                   batches: Iterable[Any] | None = None, loss_fn: Any = None) -> None:
        """Write the initial factors in place (under torch.no_grad)."""

    def options(self) -> dict[str, Any]:
        return {}


# --------------------------------------------------------------------------- Recipe
def _part(kind: str, **kw: Any) -> Any:
    """A Recipe field naming component(s) of `kind`: overridable by name or instance."""
    return field(metadata={"part": kind}, **kw)


def _setting(**kw: Any) -> Any:
    """A Recipe field that configures the step: overridable, saved with the recipe."""
    return field(metadata={"setting": True}, **kw)


@dataclass
class Recipe:
    """A named method: which components, with defaults. Every part can be overridden.

    `manifolds` maps factor names (or tuples for coupled manifolds) to manifold
    names and overrides the adapter's `default_manifolds`. `options` are keyword
    defaults handed to whichever of the recipe's components accept them (e.g.
    `rslora`, `dropout`); one no component takes (after an override replaced the
    component that did) is dropped.
    `lr` is the learning rate the method recommends (from its paper or from a sweep
    recorded in docs/benchmarks.md); the `train` / `compare` jobs use it unless the
    config sets one. It is advice for the optimizer, not part of the adapted model.

    Which fields are component parts (`parts()`) and which are step settings
    (`settings()`) is read off the field metadata: override handling and the
    saved JSON follow from it.
    """

    name: str
    adapter: str = _part("adapter", default="lora")
    manifolds: dict[str, str] = _part("manifold", default_factory=dict)
    transforms: list[str] = _part("gradient_transform", default_factory=list)
    rank_controller: str = _part("rank_controller", default="fixed")
    initializer: str = _part("initializer", default="lora")
    riemannian_grad: bool = _setting(default=True)
    project_every: int = _setting(default=1)
    moments: str = _setting(default="keep")
    lr: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    MOMENTS: ClassVar[tuple[str, ...]] = ("keep", "transport")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def parts(cls) -> dict[str, str]:
        """{field: component kind} for the fields that name components."""
        return {f.name: f.metadata["part"] for f in fields(cls) if "part" in f.metadata}

    @classmethod
    def settings(cls) -> list[str]:
        """The fields that configure the step (riemannian_grad, project_every, moments)."""
        return [f.name for f in fields(cls) if f.metadata.get("setting")]


# --------------------------------------------------------------------------- TargetPreset
@dataclass(frozen=True)
class TargetPreset:
    """Default `targets` for a family of models, used by `adapt` when `targets` is omitted.

    A preset matches a model by its HF `config.model_type` (`model_types`) or by the
    fully qualified name of its class or of a base class (`classes`, e.g.
    "timm.models.vision_transformer.VisionTransformer"), read off the model: matching
    imports nothing, so a plugin of presets needs none of the libraries it describes.
    `targets` is what `adapt(targets=...)` takes: module names (PEFT's suffix rule) or a
    regular expression.
    """

    name: str
    targets: tuple[str, ...] | str
    model_types: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    description: str = ""

    def matches(self, model: nn.Module) -> bool:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if isinstance(model_type, str) and model_type in self.model_types:
            return True
        return any(f"{c.__module__}.{c.__qualname__}" in self.classes for c in type(model).__mro__)

    def select(self) -> str | list[str]:
        """The `targets` value for `adapt`."""
        return self.targets if isinstance(self.targets, str) else list(self.targets)
