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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import ShapeError
from .layers import LayerOps, layer_ops

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
    #: True when the manifold couples several factors (x is a tuple of tensors).
    coupled: ClassVar[bool] = False
    #: How the optimizer restores feasibility after the base step: "retract" moves
    #: from the old point along the projected step; "project" maps the new point.
    post_step: ClassVar[str] = "retract"
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
        default retract(x, project_tangent(x, new − x)). Override to change the step
        (StelLA scales it) or to fuse the two into one faster kernel."""
        return self.retract(x, self.project_tangent(x, new - x))

    @abc.abstractmethod
    def project(self, x: Tensor) -> Tensor:
        """The nearest point of M to x (or a cheap feasible point that fixes x when x ∈ M)."""

    @abc.abstractmethod
    def violation(self, x: Tensor) -> Tensor:
        """How far x is from M, per batch entry: shape x.shape[:-2]. 0 on M."""

    @abc.abstractmethod
    def random_point(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """A random point of M of the given (..., n, p) shape."""

    def options(self) -> dict[str, Any]:
        """The constructor options, for saving a recipe as JSON."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


# --------------------------------------------------------------------------- Adapter
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
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.ops: LayerOps = ops
        self._base = (base,)  # a reference, not a submodule
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.rslora = bool(rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.factor_dtype = dtype or base.weight.dtype
        # a weightless (meta) base layer still gets real factors, on the CPU
        self.factor_device = torch.device("cpu") if base.weight.is_meta else base.weight.device
        self._manifolds: dict[FactorKey, Manifold] = {}

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

    @abc.abstractmethod
    def to_lora(self) -> tuple[Tensor, Tensor]:
        """(B (m, r), A (r, n)) with `scaling * B @ A` equal to ΔW as an (m, n) matrix."""

    @torch.no_grad()
    def resize(self, new_rank: int, keep: Tensor | None = None) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Change the rank, keeping the rank-indices `keep` (default: the leading ones)
        and zero-filling new ones. Each factor becomes a new Parameter (autograd caches a
        leaf's shape, so a leaf cannot change shape in place); returns {factor: (old, new)}
        so an optimizer can follow — `GeometricOptimizer.resize` does. `scaling` does not
        change: a rank change must not rescale the output."""
        from geopeft.kernels import resize_along

        if not isinstance(new_rank, int) or new_rank < 1:
            raise ValueError(f"new rank must be a positive int, got {new_rank!r}")
        if keep is not None:
            keep = torch.as_tensor(keep)
            if (keep.dim() != 1 or keep.is_floating_point() or len(keep) > new_rank
                    or (len(keep) and (int(keep.min()) < 0 or int(keep.max()) >= self.rank))
                    or len(torch.unique(keep)) != len(keep)):
                raise ShapeError(f"keep must be distinct rank indices in [0, {self.rank}), at most "
                                 f"{new_rank} of them (the new rank); got {keep.tolist()}")
        swapped = {}
        for name, old in self.factors().items():
            new = nn.Parameter(resize_along(old.detach(), self.rank_dims[name], new_rank, keep),
                               requires_grad=old.requires_grad)
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
        m, n = self.shape
        return f"{self.ops.kind} {m}x{n}, rank={self.rank}, scaling={self.scaling:.4g}"


# --------------------------------------------------------------------------- GradientTransform
class GradientTransform(abc.ABC):
    """Rewrites one adapter's factor gradients before the base optimizer step.

    Chained in recipe order, like optax. `requires` names the factors it needs;
    adapt() refuses an adapter that lacks one, naming both components.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()

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

    def check_optimizer(self, optimizer: torch.optim.Optimizer, adapters: Sequence[Adapter]) -> None:  # noqa: B027
        """Called once when `geopeft.optimizer` wraps `optimizer` (the inner one): raise a
        `ConfigError` if it cannot carry out this transform's gradients (e.g. a transform
        that takes its own step needs them applied as is). Default: any optimizer works."""

    def options(self) -> dict[str, Any]:
        return {}


# --------------------------------------------------------------------------- RankController
class RankController(abc.ABC):
    """Decides ranks during training; the optimizer calls it after every step."""

    name: ClassVar[str] = ""
    #: True when it never changes a rank: the optimizer does not call it.
    static: ClassVar[bool] = False

    @abc.abstractmethod
    def step(self, step: int, adapters: Sequence[tuple[str, Adapter]],
             optimizer: Any) -> dict[str, int] | None:
        """Apply rank changes (through `optimizer.resize`); return {module name: new rank}."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    def options(self) -> dict[str, Any]:
        return {}


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
@dataclass
class Recipe:
    """A named method: which components, with defaults. Every part can be overridden.

    `manifolds` maps factor names (or tuples for coupled manifolds) to manifold
    names and overrides the adapter's `default_manifolds`. `options` are keyword
    defaults handed to whichever components accept them (e.g. `rslora`, `dropout`).
    """

    name: str
    adapter: str = "lora"
    manifolds: dict[str, str] = field(default_factory=dict)
    transforms: list[str] = field(default_factory=list)
    rank_controller: str = "fixed"
    initializer: str = "lora"
    riemannian_grad: bool = True
    project_every: int = 1
    moments: str = "keep"
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    MOMENTS: ClassVar[tuple[str, ...]] = ("keep", "transport")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
