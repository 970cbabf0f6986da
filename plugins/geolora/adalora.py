"""The `adalora` rank controller: AdaLoRA's budget allocation, by resizing.

Q. Zhang et al., *Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning*
(ICLR 2023, arXiv 2303.10512), as PEFT's `RankAllocator` implements it, on the `usv`
adapter with a diagonal S: triplet i of a layer is (U[:, i], S[i], V[:, i]) — PEFT's
(lora_B[:, i], lora_E[i], lora_A[i]).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from geopeft import ConfigError, RankChange, RankController
from geopeft.kernels import resize_along

from .controller import check_basis_manifolds, initial_rank
from .history import RankHistory

FACTORS = ("U", "S", "V")
INITIAL_RATIO = 1.5  # initial rank / target rank when target_rank is None (PEFT's 12 → 8)


class AdaLoRAController(RankController):
    """Prunes triplets to AdaLoRA's cubic budget schedule; the optimizer applies it.

    Importance of every entry p: I = |p·∇p|, smoothed Ī ← β₁Ī + (1−β₁)I, uncertainty
    Ū ← β₂Ū + (1−β₂)|I − Ī|, score Ī·Ū; a triplet's score is S's entry plus the mean
    score of its U column and of its V column. Budget at step g (0-based): the initial
    total rank b₀ until `tinit`, then b_T + (b₀ − b_T)(1 − (g − tinit)/(T − tfinal − tinit))³
    (b_T = `target_rank` × layers — or, with `target_rank=None`, the default, the rank adapt
    was asked for: adapters start at ⌈1.5·rank⌉, PEFT's init_r 12 → target_r 8 — T =
    `total_steps`), pruning every `delta_t` steps, and
    from T − tfinal on the ranks are fixed. At a pruning step the `budget` best triplets
    over all layers are kept (each layer keeps at least one) and the others removed by
    `GeometricOptimizer.resize_many` — factors, optimizer state and scores alike.
    """

    name = "adalora"
    requires = frozenset(FACTORS)

    def __init__(self, target_rank: int | None = None, total_steps: int | None = None, tinit: int = 0,
                 tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85):
        if not (target_rank is None or (isinstance(target_rank, int) and target_rank >= 1)):
            raise ValueError(f"target_rank must be a positive int or None (the rank adapt was asked "
                             f"for), got {target_rank!r}")
        if total_steps is not None and not (isinstance(total_steps, int) and total_steps > tinit + tfinal):
            raise ValueError(f"total_steps must be an int > tinit + tfinal ({tinit + tfinal}), got {total_steps!r}")
        if not (isinstance(delta_t, int) and delta_t >= 1):
            raise ValueError(f"delta_t must be a positive int, got {delta_t!r}")
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < beta < 1.0:
                raise ValueError(f"{label} must be in (0, 1), got {beta!r}")
        self.target_rank, self.total_steps = target_rank, total_steps
        self.tinit, self.tfinal, self.delta_t = int(tinit), int(tfinal), delta_t
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.init_budget: int | None = None
        self._target_total = 0
        self.scores: dict[str, dict[str, Tensor]] = {}  # layer -> {"U", "S", "V", "uU", "uS", "uV"}
        self.history = RankHistory(self.name)
        self._layers = 0

    @property
    def rank_history(self) -> list[dict[str, Any]]:
        return self.history.entries

    def check_optimizer(self, optimizer, adapters):
        self._layers = len(adapters)
        if self.total_steps is None:
            raise ConfigError("rank controller 'adalora' needs total_steps= (the number of optimizer "
                              "steps of the run) for its budget schedule")
        for name, a in adapters:
            check_basis_manifolds(self.name, name, a)
            if a.S.dim() != 1:
                raise ConfigError(f"rank controller 'adalora' scores triplets (U[:, i], S[i], V[:, i]) and "
                                  f"needs a diagonal S, but the adapter on {name!r} has a full S: pass "
                                  "diag_s=True")
        self._target_total = self._targets(adapters)
        if self._target_total > sum(a.rank for _, a in adapters):
            raise ConfigError(f"adalora target_rank={self.target_rank} is above the initial ranks: "
                              "use target_rank <= rank")

    def initial_rank(self, rank: int) -> int:
        """With `target_rank=None` (the default) `rank` is the target and the adapters start
        at ⌈1.5·rank⌉ (PEFT's default init_r 12 → target_r 8); with a `target_rank`, `rank`
        is the initial rank, as PEFT's init_r."""
        return math.ceil(INITIAL_RATIO * rank) if self.target_rank is None else rank

    def _targets(self, adapters) -> int:
        """b_T: `target_rank` × layers, or (target_rank=None) Σ r₀ / 1.5 layer by layer, r₀
        the rank each adapter was built at (read off its fixed scale α/r₀, like GeoLoRA's)."""
        if self.target_rank is not None:
            return self.target_rank * len(adapters)
        return sum(max(1, round(initial_rank(a) / INITIAL_RATIO)) for _, a in adapters)

    def budget_schedule(self, g: int) -> tuple[int, bool]:
        """(budget, prune now?) at 0-based step g, as PEFT's RankAllocator.budget_schedule."""
        total, target = self.total_steps, self.target_budget
        if g <= self.tinit:
            return self.init_budget, False
        if g > total - self.tfinal:
            return target, True
        coeff = 1 - (g - self.tinit) / (total - self.tfinal - self.tinit)
        return int((self.init_budget - target) * coeff ** 3 + target), g % self.delta_t == 0

    @property
    def target_budget(self) -> int:
        return self._target_total

    # ------------------------------------------------------------------ importance
    @torch.no_grad()
    def before_step(self, step, adapters, optimizer):
        """Smoothed sensitivity from this step's raw gradients (before any transform or
        Riemannian projection rewrites them), all layers in a few fused foreach calls."""
        self._layers = len(adapters)
        self._target_total = self._targets(adapters)
        if self.init_budget is None:
            self.init_budget = sum(a.rank for _, a in adapters)
        self.history.start({n: a.rank for n, a in adapters})
        if step >= self.total_steps - self.tfinal:
            self.scores = {}
            return
        live = [(n, a) for n, a in adapters if all(getattr(a, f).grad is not None for f in FACTORS)]
        if not live:
            return
        for n, a in live:
            if n not in self.scores:
                self.scores[n] = {k: torch.zeros_like(getattr(a, k[-1]), dtype=torch.float32)
                                  for k in ("U", "S", "V", "uU", "uS", "uV")}
        params = [getattr(a, f).detach().float() for _, a in live for f in FACTORS]
        grads = [getattr(a, f).grad.float() for _, a in live for f in FACTORS]
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        avg = [self.scores[n][f] for n, _ in live for f in FACTORS]
        unc = [self.scores[n]["u" + f] for n, _ in live for f in FACTORS]
        torch._foreach_mul_(avg, self.beta1)
        torch._foreach_add_(avg, ipt, alpha=1 - self.beta1)
        dev = torch._foreach_sub(ipt, avg)
        torch._foreach_abs_(dev)
        torch._foreach_mul_(unc, self.beta2)
        torch._foreach_add_(unc, dev, alpha=1 - self.beta2)

    def triplet_scores(self, name: str) -> Tensor:
        """(r,) the score of each triplet of layer `name`."""
        sc = self.scores[name]
        return sc["S"] * sc["uS"] + (sc["U"] * sc["uU"]).mean(0) + (sc["V"] * sc["uV"]).mean(0)

    # ------------------------------------------------------------------ allocation
    @torch.no_grad()
    def step(self, step, adapters, optimizer):
        g = step - 1
        final = self.total_steps - self.tfinal
        if g > final:
            return None
        budget, prune = self.budget_schedule(g)
        total = sum(a.rank for _, a in adapters)
        if not (prune or g == final) or budget >= total or not self.scores:
            return None
        keep = self._allocate(adapters, budget)
        changes = [RankChange(n, len(idx), keep=idx) for (n, a), idx in zip(adapters, keep) if len(idx) < a.rank]
        optimizer.resize_many(changes)
        for c in (c for c in changes if c.name in self.scores):
            self.scores[c.name] = {k: resize_along(v, (0,) if k.endswith("S") else (1,), c.rank, c.keep)
                                   for k, v in self.scores[c.name].items()}
        if g == final:
            self.scores = {}
        self.history.record(step, {n: a.rank for n, a in adapters})
        return {c.name: c.rank for c in changes}

    def _allocate(self, adapters, budget: int) -> list[Tensor]:
        """Kept triplet indices per layer (sorted): each layer's best one, then the best of
        the rest over all layers, `budget` in all."""
        # a layer that never had gradients (e.g. a pooler the loss does not use) scores 0
        scores = [self.triplet_scores(n) if n in self.scores else
                  torch.zeros(a.rank, dtype=torch.float32, device=a.S.device) for n, a in adapters]
        flat = torch.cat(scores)
        offsets = torch.tensor([0] + [len(s) for s in scores]).cumsum(0)
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[offsets[:-1] + torch.stack([s.argmax() for s in scores])] = True
        rest = budget - len(scores)
        if rest > 0:
            masked = flat.masked_fill(chosen, float("-inf"))
            chosen[masked.topk(rest).indices] = True
        return [chosen[int(offsets[i]):int(offsets[i + 1])].nonzero().flatten() for i in range(len(scores))]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"init_budget": self.init_budget, "rank_history": self.history.state_dict(),
                "scores": {n: {k: v.clone() for k, v in sc.items()} for n, sc in self.scores.items()}}

    def load_state_dict(self, state) -> None:
        self.init_budget = state.get("init_budget")
        self.history.load_state_dict(state.get("rank_history", []))
        self.scores = {n: {k: v.clone() for k, v in sc.items()} for n, sc in state.get("scores", {}).items()}

    def options(self) -> dict[str, Any]:
        return {"target_rank": self.target_rank, "total_steps": self.total_steps, "tinit": self.tinit,
                "tfinal": self.tfinal, "delta_t": self.delta_t, "beta1": self.beta1, "beta2": self.beta2}
