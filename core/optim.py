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
With several active adapters (`geopeft.set_adapter(model, ["a", "b"])`) each is one
`Part`: its own recipe's transforms, geometry and rank controller act on its own factors
only (stages 1, 2, 4, 5 and 6 run per part, each on its part's factor groups; stage 3 is one
step of the one inner optimizer). One part is the single-adapter step, op for op.
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
from geopeft.kernels.batched import DTensor, mean_into_new

from .data_parallel import GradientSync, resizable, wrapper_group
from .errors import ConfigError, GeopeftError, ShapeError
from .geometry import FactorGroup, factor_groups
from .interfaces import Adapter, RankChange, factor_names_of
from .model import adapters, require_state
from .recipes import Resolved
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
    parts = [Part(name, adapters(model, name), state.by_name[name].resolved) for name in state.active]
    group = wrapper_group(model, [f for part in parts for f in part.resizable()])
    return GeometricOptimizer(inner, parts, max_nonfinite_steps=max_nonfinite_steps,
                              sync=GradientSync(group))


class Part:
    """One active adapter's recipe over its own factors: the transforms (and their state,
    per layer), geometry settings and rank controller that the step applies to them, and
    the factor groups planned from them alone (`plan`)."""

    def __init__(self, name: str, named_adapters: Sequence[tuple[str, Adapter]], resolved: Resolved):
        self.name = name
        self.named_adapters = list(named_adapters)
        self.recipe = resolved.recipe
        self.transforms = list(resolved.transforms)
        self.rank_controller = resolved.rank_controller
        self.transform_states: dict[str, list[dict[str, Tensor]]] = {
            n: [t.init_state(a) for t in self.transforms] for n, a in self.named_adapters}

    def plan(self) -> None:
        """The part's retract / project groups and same-shape transform groups."""
        groups = [g for g in factor_groups([a for _, a in self.named_adapters]) if not g.manifold.is_euclidean]
        self.retract_groups = [g for g in groups if g.manifold.post_step == "retract"]
        self.project_groups = [g for g in groups if g.manifold.post_step == "project"]
        by_shape: dict[tuple, list[tuple[str, Adapter]]] = defaultdict(list)
        for name, a in self.named_adapters:
            key = (type(a), tuple(tuple(p.shape) for p in a.factors().values()))
            by_shape[key].append((name, a))
        self.transform_groups = list(by_shape.values())

    def resizable(self) -> list[tuple[str, str, nn.Parameter]]:
        return resizable(self.named_adapters, self.rank_controller)

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": {name: a.rank for name, a in self.named_adapters},
                "transforms": {n: [{k: v.clone() for k, v in s.items()} for s in states]
                               for n, states in self.transform_states.items()},
                "rank_controller": self.rank_controller.state_dict()}


class PartView:
    """What a part's rank controller sees as the optimizer when several parts train: the
    optimizer, with `resize` / `resize_many` resolving layer names among the part's
    adapters (a layer may carry an adapter of each part)."""

    def __init__(self, optimizer: GeometricOptimizer, part: Part):
        self._optimizer, self._part = optimizer, part

    def resize(self, name: str, new_rank: int, keep: Tensor | None = None, **kw: Any) -> None:
        self._optimizer.resize(name, new_rank, keep, adapter=self._part.name, **kw)

    def resize_many(self, changes: Sequence[RankChange]) -> None:
        self._optimizer.resize_many(changes, adapter=self._part.name)

    @property
    def named_adapters(self) -> list[tuple[str, Adapter]]:
        return self._part.named_adapters

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


class GeometricOptimizer(WrappedOptimizer):
    """A torch optimizer that runs the geopeft step (module docstring) around `self.optimizer`."""

    def __init__(self, inner: torch.optim.Optimizer, parts: Sequence[Part], *,
                 max_nonfinite_steps: int | None = 100, sync: GradientSync | None = None):
        if max_nonfinite_steps is not None and (isinstance(max_nonfinite_steps, bool) or not isinstance(
                max_nonfinite_steps, int) or max_nonfinite_steps < 1):
            raise ConfigError(f"max_nonfinite_steps must be a positive int or None, got "
                              f"{max_nonfinite_steps!r}")
        super().__init__(inner)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.parts = list(parts)
        if not self.parts or len({p.name for p in self.parts}) != len(self.parts):
            raise ConfigError(f"GeometricOptimizer needs one Part per adapter, got {[p.name for p in self.parts]}")
        self.step_count = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0  # skipped steps since the last step taken
        self._warned_nonfinite = False
        self._check_factors_are_optimized()
        self._check_eps_representable()
        self._no_weight_decay_on_manifolds()
        for part in self.parts:
            for transform in part.transforms:
                transform.check_optimizer(inner, [a for _, a in part.named_adapters])
            part.rank_controller.check_optimizer(inner, part.named_adapters)
        # data parallel: the gradients of factors a rank change replaces (`data_parallel`)
        self._sync = sync if sync is not None else GradientSync()
        self._plan()

    def __repr__(self) -> str:
        if len(self.parts) == 1:
            return (f"GeometricOptimizer(method={self.recipe.name!r}, adapters={len(self.named_adapters)}, "
                    f"inner={self.optimizer!r})")
        methods = {p.name: p.recipe.name for p in self.parts}
        return f"GeometricOptimizer(adapters={methods}, inner={self.optimizer!r})"

    # ------------------------------------------------------------------ the parts
    @property
    def named_adapters(self) -> list[tuple[str, Adapter]]:
        """[(layer, adapter)] of every part (a layer appears once per part adapting it)."""
        if len(self.parts) == 1:
            return self.parts[0].named_adapters
        return [na for part in self.parts for na in part.named_adapters]

    def part(self, adapter: str | None = None) -> Part:
        """The part of adapter `adapter`; without a name, the only one (GeopeftError when
        several adapters train together)."""
        if adapter is None:
            if len(self.parts) == 1:
                return self.parts[0]
            raise GeopeftError(f"adapters {', '.join(repr(p.name) for p in self.parts)} train together, "
                               "each with its own recipe: name one, optimizer.part('<adapter>')")
        for part in self.parts:
            if part.name == adapter:
                return part
        raise GeopeftError(f"this optimizer trains adapters {', '.join(repr(p.name) for p in self.parts)}, "
                           f"not {adapter!r}")

    recipe = property(lambda self: self.part().recipe)
    transforms = property(lambda self: self.part().transforms)
    rank_controller = property(lambda self: self.part().rank_controller)
    transform_states = property(lambda self: self.part().transform_states)

    def _controller_view(self, part: Part) -> GeometricOptimizer | PartView:
        """The optimizer a part's rank controller is handed: this one, or with several
        parts a view resolving its layer names among the part's adapters."""
        return self if len(self.parts) == 1 else PartView(self, part)

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
        for part in self.parts:  # each part's groups from its own factors: never stacked across parts
            part.plan()
        # factors whose transform takes its own step, by param group: stage 3 applies them
        own = {id(p) for part in self.parts if any(t.takes_own_step for t in part.transforms)
               for _, a in part.named_adapters for p in a.factors().values()}
        self._own_step = [(g, [p for p in g["params"] if id(p) in own]) for g in self.param_groups]
        self._own_step = [(g, ps) for g, ps in self._own_step if ps]
        self._sync.attach([f for part in self.parts for f in part.resizable()])

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
        olds = [[(g, g.stacked()) for g in part.retract_groups
                 if any(p.grad is not None for ps in g.params for p in ps)] for part in self.parts]
        for part, part_olds in zip(self.parts, olds):
            self._riemannian_grad(part, part_olds)
        projecting = [self._projecting(part) for part in self.parts]
        before = [(g, g.stacked()) for groups in projecting for g in groups]  # to put back if 4-5 fail
        self._base_step()
        try:  # stages 4 and 5 compute every value first; only then is anything written
            writes = Writes()
            for part, part_olds, groups in zip(self.parts, olds, projecting):
                moved = self._retract(part_olds, writes) + self._project(groups, writes)
                self._transport(part, moved, writes)
        except Exception as exc:
            self._put_back([o for part_olds in olds for o in part_olds] + before, exc)
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
        """Before stage 1: each rank controller's look at the raw gradients (`before_step`)."""
        for part in self.parts:
            if not part.rank_controller.static:
                part.rank_controller.before_step(self.step_count, part.named_adapters,
                                                 self._controller_view(part))

    def _apply_transforms(self) -> None:
        """Stage 1: each part's transforms, in recipe order, on same-shape adapters at once."""
        pending: list[tuple[Tensor, Tensor]] = []
        for part in self.parts:
            if part.transforms:
                self._transform_part(part, pending)
        for grad, new in pending:  # every transform ran before any gradient changes
            assign_(grad, new)

    def _transform_part(self, part: Part, pending: list[tuple[Tensor, Tensor]]) -> None:
        for members in part.transform_groups:
            live = [(n, a) for n, a in members if all(p.grad is not None for p in a.factors().values())]
            if not live:
                continue
            # transforms see whole gradients (sharded ones gathered) and read factors
            # through geopeft.kernels.full; each rank keeps its shard of the result
            grads = [{f: full(p.grad) for f, p in a.factors().items()} for _, a in live]
            for i, transform in enumerate(part.transforms):
                states = [part.transform_states[n][i] for n, _ in live]
                grads = transform.transform_group([a for _, a in live], grads, states)
            for (name, a), new in zip(live, grads):
                for f, p in a.factors().items():
                    if new[f] is not p.grad:
                        _check_shape(new[f], p.grad, f"gradient transforms ({', '.join(part.recipe.transforms)})",
                                     f"the gradient of factor {f!r} on {name!r}")
                        pending.append((p.grad, new[f]))

    def _riemannian_grad(self, part: Part, olds: list[tuple[FactorGroup, Points]]) -> None:
        """Stage 2: gradients ← egrad_to_rgrad at the stacked old points, per retract group
        of `part` (members whose gradients are all present; for a coupled manifold, tuples)."""
        if not part.recipe.riemannian_grad:
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

    def _projecting(self, part: Part) -> list[FactorGroup]:
        """`part`'s project groups that stage 4b projects after this step (every `project_every`-th)."""
        if not part.project_groups or (self.step_count + 1) % part.recipe.project_every:
            return []
        return part.project_groups

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

    def _transport(self, part: Part, moved: list[tuple[FactorGroup, Points, Points]], writes: Writes) -> None:
        """Stage 5 (`part`'s recipe has `moments="transport"`): first moments follow their
        factors, manifold.transport(old, new, moments) batched per group, tuples if coupled."""
        if part.recipe.moments != "transport":
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
        """Stage 6: each part's rank controller (not called when it is `static`)."""
        changed = False
        for part in self.parts:
            if not part.rank_controller.static:
                changed |= bool(part.rank_controller.step(self.step_count, part.named_adapters,
                                                          self._controller_view(part)))
        if changed:
            self._plan()

    # ------------------------------------------------------------------ ranks
    def resize(self, name: str, new_rank: int, keep: Tensor | None = None, *,
               basis: Mapping[str, Sequence[Tensor]] | None = None,
               values: Mapping[str, Tensor] | None = None, adapter: str | None = None) -> None:
        """Change the rank of the adapter on `name` (of adapter `adapter`, where several
        train together: see `resize_many`; and `Adapter.resize`); param groups
        and state follow. Kept indices `keep`: state entries the factor's shape are cut
        and zero-padded alike. A change of `basis`: first moments (`exp_avg`,
        `momentum_buffer`) are mapped by it as the factor is, the other factor-shaped
        entries (second moments) by its elementwise square — non-negative, exact for a
        selection, and for a rotation the second moment of coordinates taken as independent."""
        self.resize_many([RankChange(name, new_rank, keep, basis, values)], adapter=adapter)

    def resize_many(self, changes: Sequence[RankChange], adapter: str | None = None) -> None:
        """Several `resize`s at once: one pass over the param groups, one re-plan, the
        state of same-shape factors moved in stacked calls. Layer names are those of
        adapter `adapter`'s part (needed where several adapters train and a name is in two)."""
        named = self._named_for(changes, adapter)
        unknown = [c.name for c in changes if c.name not in named]
        if unknown:
            raise GeopeftError(f"no adapter on {', '.join(unknown[:5])}; adapters: "
                               f"{', '.join(list(named)[:5])}…")
        swap: dict[int, nn.Parameter] = {}
        # (kind, shape, dims, rank, dtype, device) -> [(state entry, its new owner, key, basis, policy)]
        rotations: dict[tuple, list[tuple[Tensor, nn.Parameter, str, Sequence[Tensor], str]]] = defaultdict(list)
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
                policy = (change.new_second_moments or {}).get(fname, "zero")
                for key, v in state.items():
                    if not (torch.is_tensor(v) and v.dim() > 0 and v.shape == old.shape):
                        continue
                    kind = "first" if key in FIRST_MOMENTS else "squared"
                    if basis is None:
                        state[key] = resize_along(v, dims, change.rank, change.keep)
                        if kind == "squared" and policy == "mean":
                            state[key] = _mean_into_padded(state[key], v, dims, change)
                    else:
                        sig = (kind, tuple(v.shape), dims, change.rank, v.dtype, v.device)
                        rotations[sig].append((v, new, key, basis, policy))
        for (kind, _, dims, *_), items in rotations.items():
            mats = [torch.stack([basis[i] for *_, basis, _ in items]) for i in range(len(dims))]
            if kind == "squared":
                mats = [m * m for m in mats]
            moved = change_basis(torch.stack([v for v, *_ in items]), dims, mats)
            for (_, new, key, _, _), value in zip(items, moved.unbind(0)):
                self.state[new][key] = value
            seeded = [i for i, item in enumerate(items) if item[-1] == "mean"] if kind == "squared" else []
            if seeded:  # gathered whole and written back (a sharded moment keeps its shard)
                targets = [self.state[items[i][1]][items[i][2]] for i in seeded]
                whole = torch.stack([full(t) for t in targets])
                write_stacked(targets, mean_into_new(whole, dims, [m[seeded] for m in mats]))
        for group in self.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]
        self._plan()

    def _named_for(self, changes: Sequence[RankChange], adapter: str | None) -> dict[str, Adapter]:
        """{layer: adapter} in which `changes` name their layers."""
        if adapter is not None or len(self.parts) == 1:
            return dict(self.part(adapter).named_adapters)
        owners = defaultdict(list)
        for part in self.parts:
            for name, a in part.named_adapters:
                owners[name].append((part.name, a))
        shared = [c.name for c in changes if len(owners.get(c.name, ())) > 1]
        if shared:
            raise GeopeftError(f"layer {shared[0]!r} has an adapter of each of "
                               f"{', '.join(repr(n) for n, _ in owners[shared[0]])}, which train together: "
                               "say whose, resize_many(changes, adapter='<name>')")
        return {name: found[0][1] for name, found in owners.items()}

    def ranks(self) -> dict[str, int] | dict[str, dict[str, int]]:
        """{layer: rank}; with several adapters training together {adapter: {layer: rank}}."""
        if len(self.parts) == 1:
            return {name: a.rank for name, a in self.named_adapters}
        return {part.name: {name: a.rank for name, a in part.named_adapters} for part in self.parts}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's, plus under "geopeft" the step counts and, for one adapter,
        its ranks, transform states and rank controller's state (with several adapters
        training together, those per adapter under "adapters")."""
        sd = self.optimizer.state_dict()
        counts = {"step": self.step_count, "skipped_steps": self.skipped_steps,
                  "consecutive_skips": self.consecutive_skips}
        if len(self.parts) == 1:
            sd["geopeft"] = {**counts, **self.parts[0].state_dict()}
        else:
            sd["geopeft"] = {**counts, "adapters": {p.name: p.state_dict() for p in self.parts}}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("geopeft", None)
        saved = self._saved_parts(extra) if extra is not None else []
        for part, own in saved:
            names = dict(part.named_adapters)
            unknown = sorted(set(own["ranks"]) - set(names))
            if unknown:
                raise GeopeftError(f"optimizer state is for adapters this model does not have: "
                                   f"{', '.join(unknown[:5])}; load it into the model it was saved from")
            for name, rank in own["ranks"].items():
                if names[name].rank != rank:
                    self.resize_many([RankChange(name, rank)], adapter=part.name)
        self.optimizer.load_state_dict(sd)
        if extra is not None:
            self.step_count = int(extra["step"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.consecutive_skips = int(extra.get("consecutive_skips", 0))
            for part, own in saved:
                for name, states in own["transforms"].items():
                    part.transform_states[name] = [{k: v.clone() for k, v in s.items()} for s in states]
                part.rank_controller.load_state_dict(own["rank_controller"])
        self._plan()

    def _saved_parts(self, extra: Mapping[str, Any]) -> list[tuple[Part, Mapping[str, Any]]]:
        """[(part, its saved ranks / transforms / rank controller)], checking that the state
        was saved by an optimizer training the same adapters."""
        by_adapter = extra.get("adapters")
        if by_adapter is None and len(self.parts) == 1:
            return [(self.parts[0], extra)]
        mine = [p.name for p in self.parts]
        if by_adapter is None or set(by_adapter) != set(mine):
            theirs = "one adapter" if by_adapter is None else f"adapters {', '.join(map(repr, by_adapter))}"
            raise GeopeftError(f"optimizer state was saved training {theirs}, this optimizer trains "
                               f"{', '.join(map(repr, mine))}: geopeft.set_adapter(model, ...) as when it "
                               "was saved, then build the optimizer and load the state")
        return [(p, by_adapter[p.name]) for p in self.parts]


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


def _mean_into_padded(moved: Tensor, old: Tensor, dims: Sequence[int], change: RankChange) -> Tensor:
    """`moved` = resize_along(old, ...) with its padded (new) indices set by `mean_into_new`:
    the selection as a basis map whose zero columns are the padding."""
    r_old = old.shape[dims[0]]
    idx = change.keep if change.keep is not None else torch.arange(min(r_old, change.rank))
    idx = idx[:change.rank].to(device=old.device, dtype=torch.long)
    select = torch.zeros(r_old, change.rank, dtype=moved.dtype, device=moved.device)
    select[idx, torch.arange(len(idx), device=old.device)] = 1
    whole = full(moved)[None]
    out = mean_into_new(whole, dims, [select[None]] * len(dims))[0]
    if out is whole[0]:
        return moved
    assign_(moved, out)
    return moved

