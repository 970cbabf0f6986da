"""`WrappedOptimizer`: a `torch.optim.Optimizer` whose groups and state are another's.

The torch face of `GeometricOptimizer`, kept apart from its step: `param_groups`,
`state` and `defaults` *are* the inner optimizer's (the pattern of accelerate's
`AcceleratedOptimizer`), so LR schedulers, GradScaler, HF Trainer and accelerate
see a normal optimizer; `step()` runs the step hooks around the subclass's `_step`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


def _inner_attribute(name: str) -> property:
    """A property read from and written to `self.optimizer.<name>`."""
    return property(lambda self: getattr(self.optimizer, name),
                    lambda self, value: setattr(self.optimizer, name, value),
                    doc=f"the inner optimizer's `{name}`")


class WrappedOptimizer(torch.optim.Optimizer):
    """Delegates everything torch expects of an optimizer to `self.optimizer`;
    subclasses implement `_step(closure)` and may react to `_params_changed()`."""

    def __init__(self, inner: torch.optim.Optimizer):
        # torch.optim.Optimizer.__init__ is deliberately not called: the inner optimizer
        # owns param_groups and state.
        self.optimizer = inner
        # what torch.optim.Optimizer.__init__ would set up for register_*_hook
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()

    param_groups = _inner_attribute("param_groups")
    state = _inner_attribute("state")
    defaults = _inner_attribute("defaults")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._params_changed()

    def _params_changed(self) -> None:
        """Called when the parameters change (a new group); default: nothing."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for hook in list(self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        loss = self._step(closure)
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return loss

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        return self.optimizer.step(closure)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getstate__(self):  # Optimizer's own keeps only defaults, state and param_groups
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
