"""`geopeft.optimizer`: any torch optimizer, made geometry-aware.

`GeometricOptimizer._step` runs these stages, each a method:
  0. `_skip_if_nonfinite`: non-finite gradients anywhere — skip the step, change nothing,
     warn once, count it;
  1. `_apply_transforms`: gradient transforms, in recipe order, batched over same-shape adapters;
  2. `_riemannian_grad`: `egrad_to_rgrad` for factors on non-Euclidean manifolds that
     retract, when the recipe asks for it (`riemannian_grad`);
  3. `_base_step`: the base optimizer's own step (param groups, schedulers, AMP, clipping unchanged);
  4. `_retract` / `_project`: post-step geometry (`Manifold.retract_step`): Δ = x_new − x_old
     projected to the tangent space at x_old and retracted from x_old — or, for
     `post_step = "project"` manifolds, projection of x_new every `project_every` steps;
     batched per factor group;
  5. `_transport`: one pass moving first moments (`moments="transport"`) from the old points
     to the retracted or projected ones;
  6. `_update_ranks`: the rank controller (ranks change through `resize`, state follows);
     its `before_step` hook runs before stage 1, on the raw gradients (`_before_step`).
The torch-Optimizer face (param_groups, state, hooks) is `wrapped.WrappedOptimizer`.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from geopeft.kernels import assign_, change_basis, full, resize_along, stack_fp32, write_stacked
from geopeft.kernels.batched import DTensor

from .data_parallel import GradientSync, resizable, wrapper_group
from .errors import ConfigError, GeopeftError, ShapeError
from .geometry import FactorGroup, factor_groups
from .interfaces import Adapter, RankChange, factor_names_of
from .model import AdaptState, adapters, require_state
from .wrapped import WrappedOptimizer

#: optimizer-state entries that are first moments (tangent vectors) of their parameter
FIRST_MOMENTS = ("exp_avg", "momentum_buffer")

Points = Tensor | tuple[Tensor, ...]
"""Stacked factors of one group: (G, n, p), or a tuple of such for a coupled manifold."""

def optimizer(model: nn.Module, optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
              *, params: Iterable[Any] | None = None, max_nonfinite_steps: int | None = 100,
              **kwargs: Any) -> GeometricOptimizer:
    """Wrap a torch optimizer class (built here over the model's trainable parameters,
    or over `params`) or an already-built instance, for the adapted `model`.
    `max_nonfinite_steps` consecutive steps skipped for NaN/Inf gradients raise (None: never)."""
    state = require_state(model, "call geopeft.adapt(model, ...) before geopeft.optimizer(model, ...)")
    if isinstance(optimizer, torch.optim.Optimizer):
        if kwargs or params is not None:
            raise ConfigError("optimizer is already built: pass its hyper-parameters to its "
                              f"constructor, not to geopeft.optimizer ({', '.join(kwargs) or 'params'})")
        inner = optimizer
    elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise GeopeftError("the model has no parameter that requires grad: it was loaded for "
                                   "inference (geopeft.load(..., trainable=False)) or frozen by hand; "
                                   "load it with trainable=True (the default) to train it")
        inner = optimizer(params, **kwargs)
    else:
        raise ConfigError("geopeft.optimizer takes a torch.optim.Optimizer subclass (e.g. "
                          f"torch.optim.AdamW) or instance, got {optimizer!r}")
    named = adapters(model)
    group = wrapper_group(model, resizable(named, state.resolved.rank_controller))
    return GeometricOptimizer(inner, named, state, max_nonfinite_steps=max_nonfinite_steps,
                              sync=GradientSync(group))


class GeometricOptimizer(WrappedOptimizer):
    """A torch optimizer that runs the geopeft step (module docstring) around `self.optimizer`."""

    def __init__(self, inner: torch.optim.Optimizer, named_adapters: list[tuple[str, Adapter]],
                 adapt_state: AdaptState, *, max_nonfinite_steps: int | None = 100,
                 sync: GradientSync | None = None):
        if max_nonfinite_steps is not None and (isinstance(max_nonfinite_steps, bool) or not isinstance(
                max_nonfinite_steps, int) or max_nonfinite_steps < 1):
            raise ConfigError(f"max_nonfinite_steps must be a positive int or None, got "
                              f"{max_nonfinite_steps!r}")
        super().__init__(inner)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.named_adapters = list(named_adapters)
        resolved = adapt_state.resolved
        self.recipe = resolved.recipe
        self.transforms = list(resolved.transforms)
        self.rank_controller = resolved.rank_controller
        self.step_count = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0  # skipped steps since the last step taken
        self._warned_nonfinite = False
        self._check_factors_are_optimized()
        self._check_eps_representable()
        self._no_weight_decay_on_manifolds()
        for transform in self.transforms:
            transform.check_optimizer(inner, [a for _, a in self.named_adapters])
        self.rank_controller.check_optimizer(inner, self.named_adapters)
        self.transform_states: dict[str, list[dict[str, Tensor]]] = {
            name: [t.init_state(a) for t in self.transforms] for name, a in self.named_adapters}
        # data parallel: the gradients of factors a rank change replaces (`data_parallel`)
        self._sync = sync if sync is not None else GradientSync()
        self._plan()

    def __repr__(self) -> str:
        return (f"GeometricOptimizer(method={self.recipe.name!r}, adapters={len(self.named_adapters)}, "
                f"inner={self.optimizer!r})")

    # ------------------------------------------------------------------ planning
    def _params_changed(self) -> None:
        self._plan()

    def _plan(self) -> None:
        """Precompute, once per structure change, what each step touches."""
        by_kind: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = defaultdict(list)
        for g in self.param_groups:
            for p in g["params"]:  # FSDP2 shards (DTensors) apart from whole tensors it ignored
                by_kind[p.device, p.dtype, isinstance(p, DTensor)].append(p)
        self._params_by_kind = list(by_kind.values())  # one fused finite check per kind
        adapters_ = [a for _, a in self.named_adapters]
        groups = [g for g in factor_groups(adapters_) if not g.manifold.is_euclidean]
        self._retract_groups = [g for g in groups if g.manifold.post_step == "retract"]
        self._project_groups = [g for g in groups if g.manifold.post_step == "project"]
        by_shape: dict[tuple, list[tuple[str, Adapter]]] = defaultdict(list)
        for name, a in self.named_adapters:
            key = (type(a), tuple(tuple(p.shape) for p in a.factors().values()))
            by_shape[key].append((name, a))
        self._transform_groups = list(by_shape.values())
        # factors whose transform takes its own step, by param group: stage 3 applies them
        own = {id(p) for _, a in self.named_adapters for p in a.factors().values()} \
            if any(t.takes_own_step for t in self.transforms) else set()
        self._own_step = [(g, [p for p in g["params"] if id(p) in own]) for g in self.param_groups]
        self._own_step = [(g, ps) for g, ps in self._own_step if ps]
        self._sync.attach(resizable(self.named_adapters, self.rank_controller))

    def _check_factors_are_optimized(self) -> None:
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        for name, a in self.named_adapters:
            for fname, p in a.factors().items():
                if p.requires_grad and id(p) not in owned:
                    raise ConfigError(
                        f"factor {fname!r} of the adapter on {name!r} is trainable but in none of the "
                        "optimizer's param groups; build the optimizer over the model's trainable "
                        "parameters (geopeft.optimizer(model, torch.optim.AdamW, ...))")

    def _check_eps_representable(self) -> None:
        """Adam-type optimizers step a float16 parameter in float16: an `eps` that rounds to
        0 there (AdamW's 1e-8) makes 0/0 = NaN wherever a gradient is 0."""
        factors = {id(p): (name, f) for name, a in self.named_adapters for f, p in a.factors().items()}
        for group in self.param_groups:
            eps = group.get("eps")
            if not isinstance(eps, float) or eps <= 0 or torch.tensor(eps, dtype=torch.float16).item():
                continue
            for p in group["params"]:
                if p.dtype == torch.float16 and id(p) in factors:
                    name, f = factors[id(p)]
                    raise ConfigError(
                        f"factor {f!r} of the adapter on {name!r} is float16, and the optimizer's "
                        f"eps={eps} is 0 in float16: its first step would divide 0 by 0 and make the "
                        "factor NaN. Keep factors float32 (the default on float16 models: drop "
                        "dtype=torch.float16) or pass eps >= 1e-7")

    def _no_weight_decay_on_manifolds(self) -> None:
        """Factors on non-Euclidean manifolds get weight_decay 0 whatever the groups say:
        decay shrinks every factor toward 0 and so pulls it off a manifold such as Stiefel
        (unit-norm columns) — unless the manifold is a cone (`scale_invariant`), which
        decay does not leave."""
        constrained = {id(p) for a in (a for _, a in self.named_adapters)
                       for key, m in a.factor_manifolds().items()
                       if not (m.is_euclidean or m.scale_invariant)
                       for p in (getattr(a, n) for n in factor_names_of(key))}
        if not constrained:
            return
        new_groups = []
        for group in self.param_groups:
            if not group.get("weight_decay"):
                new_groups.append(group)
                continue
            keep = [p for p in group["params"] if id(p) not in constrained]
            moved = [p for p in group["params"] if id(p) in constrained]
            if keep:
                new_groups.append({**group, "params": keep})
            if moved:
                new_groups.append({**group, "params": moved, "weight_decay": 0.0})
        self.optimizer.param_groups[:] = new_groups

    # ------------------------------------------------------------------ the step
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_if_nonfinite():
            return loss
        self._before_step()
        self._apply_transforms()
        # stages 2, 4 and 5 share the stacked old points; a group none of whose factors has a
        # gradient (a rank controller moves them itself) does not move and is skipped
        olds = [(g, g.stacked()) for g in self._retract_groups
                if any(p.grad is not None for ps in g.params for p in ps)]
        self._riemannian_grad(olds)
        projecting = self._projecting()
        before = [(g, g.stacked()) for g in projecting]  # to put back if stages 4-5 fail
        self._base_step()
        try:  # stages 4 and 5 compute every value first; only then is anything written
            writes = Writes()
            moved = self._retract(olds, writes) + self._project(projecting, writes)
            self._transport(moved, writes)
        except Exception as exc:
            self._put_back(olds + before, exc)
            raise
        writes.apply()
        self._update_ranks()
        return loss

    def _skip_if_nonfinite(self) -> bool:
        """Stage 0: True (and the step counted as skipped) when a gradient holds NaN or Inf."""
        if self._grads_finite():
            self.consecutive_skips = 0
            return False
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.max_nonfinite_steps is not None and self.consecutive_skips >= self.max_nonfinite_steps:
            raise GeopeftError(
                f"{self.consecutive_skips} consecutive steps had non-finite gradients (NaN or Inf) and "
                f"were skipped ({self.skipped_steps} in all): training has diverged or its loss "
                "overflows. Lower the learning rate, check the data and the loss (use a GradScaler "
                "for float16), or pass geopeft.optimizer(..., max_nonfinite_steps=None) to skip forever")
        if not self._warned_nonfinite:
            warnings.warn("geopeft: non-finite gradients (NaN or Inf); the step was skipped and "
                          "nothing changed. Further skips are counted in optimizer.skipped_steps.",
                          RuntimeWarning, stacklevel=3)
            self._warned_nonfinite = True
        return True

    def _grads_finite(self) -> bool:
        for params in self._params_by_kind:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            # the max-abs norm: finite for every finite gradient (an L2 norm of a finite
            # fp16 gradient can overflow to inf), NaN as soon as one entry is NaN
            if not bool(torch.stack(torch._foreach_norm(grads, float("inf"))).amax().isfinite()):
                return False
        return True

    def _before_step(self) -> None:
        """Before stage 1: the rank controller's look at the raw gradients (`before_step`)."""
        if not self.rank_controller.static:
            self.rank_controller.before_step(self.step_count, self.named_adapters, self)

    def _apply_transforms(self) -> None:
        """Stage 1: each transform, in recipe order, on same-shape adapters at once."""
        if not self.transforms:
            return
        pending: list[tuple[Tensor, Tensor]] = []
        for members in self._transform_groups:
            live = [(n, a) for n, a in members if all(p.grad is not None for p in a.factors().values())]
            if not live:
                continue
            # transforms see whole gradients (sharded ones gathered) and read factors
            # through geopeft.kernels.full; each rank keeps its shard of the result
            grads = [{f: full(p.grad) for f, p in a.factors().items()} for _, a in live]
            for i, transform in enumerate(self.transforms):
                states = [self.transform_states[n][i] for n, _ in live]
                grads = transform.transform_group([a for _, a in live], grads, states)
            for (name, a), new in zip(live, grads):
                for f, p in a.factors().items():
                    if new[f] is not p.grad:
                        _check_shape(new[f], p.grad, f"gradient transforms ({', '.join(self.recipe.transforms)})",
                                     f"the gradient of factor {f!r} on {name!r}")
                        pending.append((p.grad, new[f]))
        for grad, new in pending:  # every transform ran before any gradient changes
            assign_(grad, new)

    def _riemannian_grad(self, olds: list[tuple[FactorGroup, Points]]) -> None:
        """Stage 2: gradients ← egrad_to_rgrad at the stacked old points, per retract group
        (members whose gradients are all present; for a coupled manifold, tuples)."""
        if not self.recipe.riemannian_grad:
            return
        writes = Writes()
        for group, old in olds:
            grads = [[ps[j].grad for ps in group.params] for j in range(len(group.names))]
            live = [i for i in range(len(group.params)) if all(g[i] is not None for g in grads)]
            if not live:
                continue
            x = old if len(live) == len(group.params) else _select(old, live)
            g = _pack(group, [stack_fp32([gs[i] for i in live]) for gs in grads])
            writes.add(group, "egrad_to_rgrad", [[gs[i] for i in live] for gs in grads],
                       group.manifold.egrad_to_rgrad(x, g))
        writes.apply()

    def _base_step(self) -> None:
        """Stage 3: the inner optimizer's own step — without the factors of a transform that
        takes its own step (`takes_own_step`), which get p ← p − lr·g with their group's lr."""
        if not self._own_step:
            self.optimizer.step()
        else:
            held = [(p, p.grad) for _, ps in self._own_step for p in ps]
            for p, _ in held:
                p.grad = None  # torch optimizers leave a parameter without gradient alone
            try:
                self.optimizer.step()
            finally:
                for p, g in held:
                    p.grad = g
            for group, ps in self._own_step:
                live = [p for p in ps if p.grad is not None]
                if live:
                    torch._foreach_add_(live, [p.grad for p in live], alpha=-float(group["lr"]))
        self.step_count += 1

    def _retract(self, olds: list[tuple[FactorGroup, Points]],
                 writes: Writes) -> list[tuple[FactorGroup, Points, Points]]:
        """Stage 4a: each retract group from its old points along the step just taken."""
        moved = []
        for group, old in olds:
            new = group.manifold.retract_step(old, group.stacked())
            writes.add(group, "retract_step", group.targets(), new)
            moved.append((group, old, new))
        return moved

    def _projecting(self) -> list[FactorGroup]:
        """The project groups that stage 4b projects after this step (every `project_every`-th)."""
        if not self._project_groups or (self.step_count + 1) % self.recipe.project_every:
            return []
        return self._project_groups

    def _project(self, groups: list[FactorGroup], writes: Writes) -> list[tuple[FactorGroup, Points, Points]]:
        """Stage 4b: project `groups` onto their manifolds."""
        moved = []
        for group in groups:
            old = group.stacked()
            new = group.manifold.project(old)
            writes.add(group, "project", group.targets(), new)
            moved.append((group, old, new))
        return moved

    def _put_back(self, points: list[tuple[FactorGroup, Points]], exc: Exception) -> None:
        """After a failure in stages 4-5: the constrained factors back to their points before
        this step (on their manifolds), so the failed step leaves none half-moved."""
        for group, old in points:
            group.write(old)
        if hasattr(exc, "add_note"):
            exc.add_note("geopeft: the geometric stage of this step failed; factors on non-Euclidean "
                         "manifolds were put back to their values before the step (the base "
                         "optimizer's own update of the other parameters and its state stand)")

    def _transport(self, moved: list[tuple[FactorGroup, Points, Points]], writes: Writes) -> None:
        """Stage 5 (`moments="transport"`): first moments follow their factors,
        manifold.transport(old, new, moments) batched per group, tuples if coupled."""
        if self.recipe.moments != "transport":
            return
        for group, old, new in moved:
            for key in FIRST_MOMENTS:
                idx = [i for i, ps in enumerate(group.params)
                       if all(key in self.state.get(p, {}) for p in ps)]
                if not idx:
                    continue
                moments = [[self.state[group.params[i][j]][key] for i in idx]
                           for j in range(len(group.names))]
                stacks = _pack(group, [stack_fp32(ms) for ms in moments])
                some = len(idx) < len(group.params)
                out = group.manifold.transport(_select(old, idx) if some else old,
                                               _select(new, idx) if some else new, stacks)
                writes.add(group, "transport", moments, out)

    def _update_ranks(self) -> None:
        """Stage 6: the rank controller (not called when it is `static`)."""
        if self.rank_controller.static:
            return
        if self.rank_controller.step(self.step_count, self.named_adapters, self):
            self._plan()

    # ------------------------------------------------------------------ ranks
    def resize(self, name: str, new_rank: int, keep: Tensor | None = None, *,
               basis: Mapping[str, Sequence[Tensor]] | None = None,
               values: Mapping[str, Tensor] | None = None) -> None:
        """Change the rank of the adapter on `name` (see `Adapter.resize`); param groups
        and state follow. Kept indices `keep`: state entries the factor's shape are cut
        and zero-padded alike. A change of `basis`: first moments (`exp_avg`,
        `momentum_buffer`) are mapped by it as the factor is, the other factor-shaped
        entries (second moments) by its elementwise square — non-negative, exact for a
        selection, and for a rotation the second moment of coordinates taken as independent."""
        self.resize_many([RankChange(name, new_rank, keep, basis, values)])

    def resize_many(self, changes: Sequence[RankChange]) -> None:
        """Several `resize`s at once: one pass over the param groups, one re-plan, the
        state of same-shape factors moved in stacked calls."""
        named = dict(self.named_adapters)
        unknown = [c.name for c in changes if c.name not in named]
        if unknown:
            raise GeopeftError(f"no adapter on {', '.join(unknown[:5])}; adapters: "
                               f"{', '.join(list(named)[:5])}…")
        swap: dict[int, nn.Parameter] = {}
        # (kind, shape, dims, rank, dtype, device) -> [(state entry, its new owner, key, basis)]
        rotations: dict[tuple, list[tuple[Tensor, nn.Parameter, str, Sequence[Tensor]]]] = defaultdict(list)
        for change in changes:
            adapter = named[change.name]
            swapped = adapter.resize(change.rank, change.keep, basis=change.basis, values=change.values)
            for fname, (old, new) in swapped.items():
                swap[id(old)] = new
                state = self.state.pop(old, None)
                if state is None:
                    continue
                self.state[new] = state  # its factor-shaped entries are replaced below
                dims = adapter.rank_dims[fname]
                basis = change.basis.get(fname) if change.basis else None
                for key, v in state.items():
                    if not (torch.is_tensor(v) and v.dim() > 0 and v.shape == old.shape):
                        continue
                    if basis is None:
                        state[key] = resize_along(v, dims, change.rank, change.keep)
                    else:
                        kind = "first" if key in FIRST_MOMENTS else "squared"
                        sig = (kind, tuple(v.shape), dims, change.rank, v.dtype, v.device)
                        rotations[sig].append((v, new, key, basis))
        for (kind, _, dims, *_), items in rotations.items():
            mats = [torch.stack([basis[i] for *_, basis in items]) for i in range(len(dims))]
            if kind == "squared":
                mats = [m * m for m in mats]
            moved = change_basis(torch.stack([v for v, *_ in items]), dims, mats)
            for (_, new, key, _), value in zip(items, moved.unbind(0)):
                self.state[new][key] = value
        for group in self.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]
        self._plan()

    def ranks(self) -> dict[str, int]:
        return {name: a.rank for name, a in self.named_adapters}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        sd["geopeft"] = {
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "ranks": self.ranks(),
            "transforms": {n: [{k: v.clone() for k, v in s.items()} for s in states]
                           for n, states in self.transform_states.items()},
            "rank_controller": self.rank_controller.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("geopeft", None)
        if extra is not None:
            names = dict(self.named_adapters)
            unknown = sorted(set(extra["ranks"]) - set(names))
            if unknown:
                raise GeopeftError(f"optimizer state is for adapters this model does not have: "
                                   f"{', '.join(unknown[:5])}; load it into the model it was saved from")
            for name, rank in extra["ranks"].items():
                if names[name].rank != rank:
                    self.resize(name, rank)
        self.optimizer.load_state_dict(sd)
        if extra is not None:
            self.step_count = int(extra["step"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.consecutive_skips = int(extra.get("consecutive_skips", 0))
            for name, states in extra["transforms"].items():
                self.transform_states[name] = [{k: v.clone() for k, v in s.items()} for s in states]
            self.rank_controller.load_state_dict(extra["rank_controller"])
        self._plan()


class Writes:
    """Values a stage computed, checked and held until `apply` writes them all: a stage
    that fails part-way has written nothing."""

    def __init__(self) -> None:
        self._pending: list[tuple[list[Tensor], Tensor]] = []

    def add(self, group: FactorGroup, op: str, targets: Sequence[Sequence[Tensor]], values: Points) -> None:
        """`values` (what `group.manifold.<op>` returned: one stack per factor name) for the
        tensors `targets` (one list per factor name); ShapeError if a stack does not fit."""
        stacks = _unpack(values)
        group.check(stacks, op, members=len(targets[0]))
        self._pending += [(list(ts), stack) for ts, stack in zip(targets, stacks)]

    def apply(self) -> None:
        for targets, stack in self._pending:
            write_stacked(targets, stack)
        self._pending.clear()


def _check_shape(value: Tensor, like: Tensor, source: str, what: str) -> None:
    if not isinstance(value, Tensor) or value.shape != like.shape:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ShapeError(f"{source} returned {got} for {what}, which is {tuple(like.shape)}; a "
                         "transform must return gradients of their factors' shapes")


def _pack(group: FactorGroup, stacks: list[Tensor]) -> Points:
    """One stack per factor name → what the group's manifold takes."""
    return tuple(stacks) if group.manifold.coupled else stacks[0]


def _unpack(points: Points) -> tuple[Tensor, ...]:
    return points if isinstance(points, tuple) else (points,)


def _select(points: Points, idx: list[int]) -> Points:
    """The members `idx` of stacked points."""
    if isinstance(points, tuple):
        return tuple(t[idx] for t in points)
    return points[idx]
