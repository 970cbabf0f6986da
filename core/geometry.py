"""Grouping factors by (manifold, shape, dtype, device) so geometry runs batched.

A `FactorGroup` holds every factor (or tuple of factors, for a coupled
manifold) that shares one manifold instance, shape, dtype and device: the
optimizer and `adapt` call the manifold once per group on stacked tensors of
shape (G, n, p) in fp32, never once per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from geopeft.kernels import stack_fp32, write_stacked

from .errors import ConfigError, ShapeError
from .interfaces import Adapter, Manifold, factor_names_of


@dataclass
class FactorGroup:
    """Same-manifold, same-shape factors. `members[i]` is (adapter, params) with one
    parameter per factor name in `names` (one for a plain manifold, several if coupled;
    for a plain manifold `names` is the first member's, other members may differ)."""

    manifold: Manifold
    names: tuple[str, ...]
    members: list[tuple[Adapter, tuple[nn.Parameter, ...]]] = field(default_factory=list)

    @property
    def params(self) -> list[tuple[nn.Parameter, ...]]:
        return [ps for _, ps in self.members]

    def stacked(self) -> Tensor | tuple[Tensor, ...]:
        """(G, n, p) fp32 stacks: one tensor, or a tuple for a coupled manifold."""
        stacks = tuple(stack_fp32([ps[i] for ps in self.params]) for i in range(len(self.names)))
        return stacks if self.manifold.coupled else stacks[0]

    def targets(self) -> list[list[nn.Parameter]]:
        """The parameters, one list per factor name (what `write` fills)."""
        return [[ps[i] for ps in self.params] for i in range(len(self.names))]

    def write(self, values: Tensor | tuple[Tensor, ...], op: str = "project") -> None:
        """Copy stacked values (what the manifold's `op` returned) back into the parameters
        (in their dtype); ShapeError, before anything is written, if a stack's shape is not
        the parameters' (a copy would broadcast it silently)."""
        values = values if isinstance(values, tuple) else (values,)
        self.check(values, op)
        for targets, stack in zip(self.targets(), values):
            write_stacked(targets, stack)

    def check(self, values: tuple[Tensor, ...], op: str, members: int | None = None) -> None:
        """ShapeError unless `values` holds one (G, *factor shape) stack per factor name
        (G = `members`, default all of them)."""
        g = len(self.members) if members is None else members
        expected = [(g, *self.params[0][i].shape) for i in range(len(self.names))]
        got = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in values]
        if got != expected:
            raise ShapeError(f"manifold {type(self.manifold).__name__} ({self.manifold.name or 'unnamed'}) "
                             f"{op} returned {got} for factors {', '.join(self.names)} stacked as "
                             f"{expected}; {op} must return its input's shape")


def factor_groups(adapters: Sequence[Adapter]) -> list[FactorGroup]:
    """The adapters' factors grouped for batched geometry, in a stable order."""
    groups: dict[tuple, FactorGroup] = {}
    for adapter in adapters:
        for key, manifold in adapter.factor_manifolds().items():
            names = factor_names_of(key)
            params = tuple(getattr(adapter, n) for n in names)
            # single factors of one manifold batch together whatever their name (U and V
            # of a square layer share a group); a coupled tuple only with the same names
            sig = (id(manifold), names if manifold.coupled else len(names),
                   tuple(tuple(p.shape) for p in params), params[0].dtype, params[0].device)
            group = groups.setdefault(sig, FactorGroup(manifold, names))
            group.members.append((adapter, params))
    return list(groups.values())


def max_violation(adapters: Sequence[Adapter]) -> float:
    """The largest manifold violation over all non-Euclidean factors (0.0 if none)."""
    worst = 0.0
    for group in factor_groups(adapters):
        if group.manifold.is_euclidean:
            continue
        with torch.no_grad():
            worst = max(worst, float(group.manifold.violation(group.stacked()).max()))
    return worst


def kept_violation(adapters: Sequence[Adapter]) -> tuple[float, int]:
    """(the largest violation over the factors each manifold keeps on it, how many factors
    — a coupled tuple counts once — its `project` leaves off by design): the invariant the
    method promises. A factor is off by design where `Manifold.initial_violation` gives 0 and
    `violation` does not (BaLoRA's pairs whose product BA has numerical rank < r)."""
    worst, off = 0.0, 0
    for group in factor_groups(adapters):
        if group.manifold.is_euclidean:
            continue
        with torch.no_grad():
            x = group.stacked()
            kept = group.manifold.initial_violation(x)
            designed = (kept == 0) & (group.manifold.violation(x) > 0)
        worst, off = max(worst, float(kept.max())), off + int(designed.sum())
    return worst, off


def check_initial_points(named: Sequence[tuple[str, Adapter]], initializer: str) -> None:
    """ConfigError unless every factor is finite and every constrained one is on its
    manifold (`Manifold.initial_violation` ≤ √ε of the factor's dtype) once `initializer`
    and the manifold's `project` have run: a factor that starts off its manifold makes the
    first step NaN (a unit-norm manifold on a factor initialised to 0)."""
    layer = {id(a): n for n, a in named}
    for group in factor_groups([a for _, a in named]):
        if group.manifold.is_euclidean:
            continue
        dtype = group.params[0][0].dtype
        tol = torch.finfo(dtype).eps ** 0.5
        with torch.no_grad():
            v = group.manifold.initial_violation(group.stacked())
        off = (~(v <= tol)).nonzero()  # NaN is off too
        if len(off):
            i = int(off[0])
            raise ConfigError(
                f"factor {','.join(group.names)!r} of the adapter on {layer[id(group.members[i][0])]!r} "
                f"starts off its manifold {group.manifold.name or type(group.manifold).__name__!r}: "
                f"after initializer {initializer!r} and the manifold's project its violation is "
                f"{float(v[i]):.3g}, above {tol:.2g} (the {str(dtype).removeprefix('torch.')} "
                "tolerance), and training from there breaks the manifold's invariant (or goes NaN); "
                "use an initializer that puts the factor on the manifold, or give that factor "
                "another manifold")
    for name, adapter in named:
        for fname, p in adapter.factors().items():
            if not bool(torch.isfinite(p).all()):
                raise ConfigError(f"initializer {initializer!r} left factor {fname!r} of the adapter on "
                                  f"{name!r} with NaN or Inf values; check the base weights (and the "
                                  "calibration batches of a data-driven initializer)")
