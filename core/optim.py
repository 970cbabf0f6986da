"""`geopeft.optimizer`: any torch optimizer, made geometry-aware.

One `step()`:
  0. non-finite gradients anywhere: skip the step, change nothing, warn once, count it;
  1. gradient transforms, per adapter, batched over same-shape adapters;
  2. Riemannian gradient (`egrad_to_rgrad`) for factors on non-Euclidean manifolds,
     when the recipe asks for it (`riemannian_grad`);
  3. the base optimizer's own step (its param groups, schedulers, AMP, clipping unchanged);
  4. post-step geometry (`Manifold.retract_step`): Δ = x_new − x_old projected to the
     tangent space at x_old and retracted from x_old — or, for `post_step = "project"` manifolds, projection
     of x_new every `project_every` steps; batched per factor group;
  5. optimizer-state maintenance: first moments transported (`moments="transport"`) from
     the old points to the retracted or projected ones;
     state resized along with factors when ranks change (`resize`);
  6. the rank controller.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from geopeft.kernels import assign_, full, resize_along, stack_fp32, write_stacked

from .errors import ConfigError, GeopeftError
from .geometry import FactorGroup, factor_groups
from .interfaces import Adapter, factor_names_of
from .model import AdaptState, adapters, find_state

#: optimizer-state entries that are first moments (tangent vectors) of their parameter
FIRST_MOMENTS = ("exp_avg", "momentum_buffer")


def optimizer(model: nn.Module, optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
              *, params: Iterable[Any] | None = None, **kwargs: Any) -> GeometricOptimizer:
    """Wrap a torch optimizer class (built here over the model's trainable parameters,
    or over `params`) or an already-built instance, for the adapted `model`."""
    state = find_state(model)
    if state is None:
        raise GeopeftError("the model has no geopeft adapters; call geopeft.adapt(model, ...) "
                           "before geopeft.optimizer(model, ...)")
    if isinstance(optimizer, torch.optim.Optimizer):
        if kwargs or params is not None:
            raise ConfigError("optimizer is already built: pass its hyper-parameters to its "
                              f"constructor, not to geopeft.optimizer ({', '.join(kwargs) or 'params'})")
        inner = optimizer
    elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        inner = optimizer(params, **kwargs)
    else:
        raise ConfigError("geopeft.optimizer takes a torch.optim.Optimizer subclass (e.g. "
                          f"torch.optim.AdamW) or instance, got {optimizer!r}")
    return GeometricOptimizer(inner, adapters(model), state)


class GeometricOptimizer(torch.optim.Optimizer):
    """A torch optimizer that runs the six-stage geopeft step around `self.optimizer`.

    `param_groups`, `state` and `defaults` are the inner optimizer's own, so LR
    schedulers, GradScaler, HF Trainer and accelerate see a normal optimizer.
    """

    def __init__(self, inner: torch.optim.Optimizer, named_adapters: list[tuple[str, Adapter]],
                 adapt_state: AdaptState):
        # torch.optim.Optimizer.__init__ is deliberately not called: the inner optimizer
        # owns param_groups and state (as accelerate's AcceleratedOptimizer does).
        self.optimizer = inner
        # what torch.optim.Optimizer.__init__ would set up for register_step_*_hook
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self.named_adapters = list(named_adapters)
        resolved = adapt_state.resolved
        self.recipe = resolved.recipe
        self.transforms = list(resolved.transforms)
        self.rank_controller = resolved.rank_controller
        self.step_count = 0
        self.skipped_steps = 0
        self._warned_nonfinite = False
        self._check_factors_are_optimized()
        self._no_weight_decay_on_manifolds()
        for transform in self.transforms:
            transform.check_optimizer(inner, [a for _, a in self.named_adapters])
        self.transform_states: dict[str, list[dict[str, Tensor]]] = {
            name: [t.init_state(a) for t in self.transforms] for name, a in self.named_adapters}
        self._plan()

    # ------------------------------------------------------------------ torch.optim.Optimizer face
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._plan()

    def __repr__(self) -> str:
        return (f"GeometricOptimizer(method={self.recipe.name!r}, adapters={len(self.named_adapters)}, "
                f"inner={self.optimizer!r})")

    def __getstate__(self):  # Optimizer's own keeps only defaults, state and param_groups
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    # ------------------------------------------------------------------ planning
    def _plan(self) -> None:
        """Precompute, once per structure change, what each step touches."""
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for g in self.param_groups:
            for p in g["params"]:
                by_kind[p.device, p.dtype].append(p)
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

    def _check_factors_are_optimized(self) -> None:
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        for name, a in self.named_adapters:
            for fname, p in a.factors().items():
                if p.requires_grad and id(p) not in owned:
                    raise ConfigError(
                        f"factor {fname!r} of the adapter on {name!r} is trainable but in none of the "
                        "optimizer's param groups; build the optimizer over the model's trainable "
                        "parameters (geopeft.optimizer(model, torch.optim.AdamW, ...))")

    def _no_weight_decay_on_manifolds(self) -> None:
        """Factors on non-Euclidean manifolds get weight_decay 0 whatever the groups say:
        decay pulls them off the manifold (GeoLoRA's official code erodes orthonormality so)
        — unless the manifold is a cone (`scale_invariant`), which decay does not leave."""
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
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for hook in list(self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        loss = self._step(closure)
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return loss

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            self.skipped_steps += 1
            if not self._warned_nonfinite:
                warnings.warn("geopeft: non-finite gradients (NaN or Inf); the step was skipped and "
                              "nothing changed. Further skips are counted in optimizer.skipped_steps.",
                              RuntimeWarning, stacklevel=2)
                self._warned_nonfinite = True
            return loss
        if self.transforms:
            self._apply_transforms()
        olds = [group.stacked() for group in self._retract_groups]  # stages 2 and 4 share them
        if self.recipe.riemannian_grad:
            for group, old in zip(self._retract_groups, olds):
                self._riemannian_grad(group, old)
        self.optimizer.step()
        for group, old in zip(self._retract_groups, olds):
            new = self._retract(group, old)
            if self.recipe.moments == "transport":
                self._transport_moments(group, old, new)
        self.step_count += 1
        if self._project_groups and self.step_count % self.recipe.project_every == 0:
            for group in self._project_groups:
                old = group.stacked()
                new = group.manifold.project(old)
                group.write(new)
                if self.recipe.moments == "transport":
                    self._transport_moments(group, old, new)
        if not self.rank_controller.static:
            changed = self.rank_controller.step(self.step_count, self.named_adapters, self)
            if changed:
                self._plan()
        return loss

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

    def _apply_transforms(self) -> None:
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
            for (_, a), new in zip(live, grads):
                for f, p in a.factors().items():
                    if new[f] is not p.grad:
                        assign_(p.grad, new[f])

    def _riemannian_grad(self, group: FactorGroup, old: Tensor) -> None:
        """Gradients ← egrad_to_rgrad at the stacked points `old` (G, n, p)."""
        grads = [ps[0].grad for ps in group.params]
        live = [i for i, g in enumerate(grads) if g is not None]
        if not live:
            return
        x = old if len(live) == len(grads) else old[live]
        g = stack_fp32([grads[i] for i in live])
        write_stacked([grads[i] for i in live], group.manifold.egrad_to_rgrad(x, g))

    def _retract(self, group: FactorGroup, old: Tensor) -> Tensor:
        point = group.manifold.retract_step(old, group.stacked())
        group.write(point, "retract_step")
        return point

    def _transport_moments(self, group: FactorGroup, old, new) -> None:
        """First moments follow their factors: manifold.transport(old, new, moments), batched;
        for a coupled manifold, points and moments are tuples with one stack per factor."""
        coupled = group.manifold.coupled
        for key in FIRST_MOMENTS:
            idx = [i for i, ps in enumerate(group.params)
                   if all(key in self.state.get(p, {}) for p in ps)]
            if not idx:
                continue
            moments = [[self.state[group.params[i][j]][key] for i in idx]
                       for j in range(len(group.names))]
            stacks = tuple(stack_fp32(ms) for ms in moments)
            if coupled:
                moved = group.manifold.transport(tuple(t[idx] for t in old),
                                                 tuple(t[idx] for t in new), stacks)
            else:
                moved = (group.manifold.transport(old[idx], new[idx], stacks[0]),)
            for ms, stack in zip(moments, moved):
                write_stacked(ms, stack)

    # ------------------------------------------------------------------ ranks
    def resize(self, name: str, new_rank: int, keep: Tensor | None = None) -> None:
        """Change the rank of the adapter on `name`; param groups and state follow
        (kept rank-indices `keep`, new ones zero)."""
        adapter = dict(self.named_adapters)[name]
        swapped = adapter.resize(new_rank, keep)
        for fname, (old, new) in swapped.items():
            for group in self.param_groups:
                group["params"] = [new if p is old else p for p in group["params"]]
            state = self.state.pop(old, None)
            if state is None:
                continue
            dims = adapter.rank_dims[fname]
            self.state[new] = {
                key: resize_along(v, dims, new_rank, keep)
                if torch.is_tensor(v) and v.shape == old.shape and v.dim() > 0 else v
                for key, v in state.items()}
        self._plan()

    def ranks(self) -> dict[str, int]:
        return {name: a.rank for name, a in self.named_adapters}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        sd["geopeft"] = {
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
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
            for name, states in extra["transforms"].items():
                self.transform_states[name] = [{k: v.clone() for k, v in s.items()} for s in states]
            self.rank_controller.load_state_dict(extra["rank_controller"])
        self._plan()
