"""The `geolora` rank controller: GeoLoRA's augmentation and truncation, batched by shape."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from geopeft import Adapter, ConfigError, RankChange, RankController
from geopeft.kernels import augment, basis_directions, core_svd, stack_fp32, tolerance_ranks

from .history import RankHistory, logger


def check_basis_manifolds(controller: str, layer: str, adapter: Adapter) -> None:
    """A rank controller that keeps, drops and adds columns of U and V keeps them on their
    manifold only if it is 'stiefel' (a subset of orthonormal columns stays orthonormal,
    and new columns are written orthonormal) or flat: refuse any other (e.g. 'oblique',
    whose rows lose their unit norm when a column goes). The core S it rewrites must be flat."""
    manifolds = adapter.factor_manifolds()
    other = [f"{f} on {m.name!r}" for f in ("U", "V") if (m := manifolds.get(f)) is not None
             and not (m.is_euclidean or m.name == "stiefel")]
    if other:
        raise ConfigError(f"rank controller {controller!r} changes the columns of U and V, which keeps "
                          f"them on 'stiefel' or 'euclidean' only, but the adapter on {layer!r} has "
                          f"{', '.join(other)}: put U and V on 'stiefel' or leave them at the default")
    core = manifolds.get("S")
    if core is not None and not core.is_euclidean:
        raise ConfigError(f"rank controller {controller!r} rewrites the core S at every rank change "
                          f"(an arbitrary r × r matrix), but the adapter on {layer!r} has S on "
                          f"{core.name!r}: leave S on 'euclidean'")


class GeoLoRAController(RankController):
    """Ranks of ΔW = s·U S Vᵀ (the `usv` adapter, full S) adapted from the one backward
    pass the user ran. A cycle of `period` optimizer steps:

    1. first step of a cycle — **augment**: from this step's gradients, U ← [U | Ũ],
       V ← [V | Ṽ] (QR of [U, G_U S⁻ᵀ], [V, G_V S⁻¹]; rank r → min(2r, r_max)) and
       S ← [[S, −λ(ṼᵀG_L)ᵀ], [−λŨᵀG_K, 0]], λ the learning rate of S's param group;
    2. the optimizer trains the augmented core (and U, V when `train_bases`);
    3. last step of a cycle — **truncate**: S = P Σ Qᵀ; keep the smallest r′ with
       ‖σ_{r′:}‖ < τ‖σ‖, clipped to [r_min, r_max]; U ← U P_{r′}, V ← V Q_{r′}, S ← Σ_{r′}.
       ΔW changes by exactly s·‖σ_{r′:}‖ (the scale s never changes).

    `period=1` is the paper's Algorithm 1 (augment, S-step, truncate in one step). With a
    `budget`, truncation keeps the largest s·σ over all layers up to that total rank
    (τ and the clip still apply; each layer keeps at least r_min). The optimizer's state
    follows every change (`GeometricOptimizer.resize_many`): moments of kept directions
    are rotated with the basis, new directions start at zero.

    Options: `tau` (0.1), `r_min` (2), `r_max` (None: 2·r₀, twice the layer's initial rank, as
    the official GLUE settings; an int caps every layer, min(m, n) at most), `period` (3: short
    runs need the bases refreshed often; see docs),
    `budget` ("initial": the total initial rank Σ r₀, LoRA's at the same rank; an int: that
    total; None: per-layer τ and r_max only), `train_bases` (True, also the `geolora`
    recipe's: the optimizer also steps U and V as their manifold says — Riemannian steps on
    `stiefel`, as StelLA's; False, the paper's: U and V move only by augmentation and
    truncation, their gradients are taken before the optimizer step — it lags LoRA under
    Adam, see docs), `damping` (1e-3: S⁻¹ damped to σ/(σ² + (damping·σ_max)²)), `total_steps`
    (None; the `train` / `compare` jobs set the run's steps: its last step truncates, whatever
    the period, so the adapter ends at most at the budget — inside a cycle a layer holds up
    to 2r directions).

    No augmentation while a layer's core is exactly 0 (at the start: its gradients G_U, G_V
    are 0 and would add arbitrary directions); its first cycle trains S at the initial rank.
    A second moment of S's new entries (Adam's `exp_avg_sq`) starts at the mean of the kept
    block's, not at 0: Adam then moves a new entry in proportion to its gradient, as the old
    ones, instead of by a full normalised step whatever its gradient (core's
    `RankChange(new_second_moments={"S": "mean"})`; see docs;
    `seed_moments = False` on the controller leaves them at 0, for comparison).
    After a truncation, a total rank above the budget (or, with `budget=None`, above Σ r₀)
    and a layer at full rank min(m, n) are logged once at WARNING on `geopeft.ranks`.
    """

    name = "geolora"
    requires = frozenset({"U", "S", "V"})

    def __init__(self, tau: float = 0.1, r_min: int = 2, r_max: int | None = None, period: int = 3,
                 budget: int | str | None = "initial", train_bases: bool = True, damping: float = 1e-3,
                 total_steps: int | None = None):
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"tau must be in [0, 1), got {tau!r}")
        for label, value in (("r_min", r_min), ("period", period)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if r_max is not None and not (isinstance(r_max, int) and r_max >= r_min):
            raise ValueError(f"r_max must be an int >= r_min ({r_min}), got {r_max!r}")
        if not (budget is None or budget == "initial" or (isinstance(budget, int) and budget >= 1)):
            raise ValueError(f"budget must be a positive int (a total rank), 'initial' (the total initial "
                             f"rank) or None (no global budget), got {budget!r}")
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        if total_steps is not None and not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be a positive int (the run's optimizer steps) or None, "
                             f"got {total_steps!r}")
        self.tau, self.r_min, self.r_max, self.period = float(tau), r_min, r_max, period
        self.budget, self.train_bases, self.damping = budget, bool(train_bases), float(damping)
        self.total_steps = total_steps
        self.history = RankHistory(self.name)
        self._captured: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._warned: set[str] = set()
        self.seed_moments = True

    @property
    def rank_history(self) -> list[dict[str, Any]]:
        """[{"step": t, "ranks": {layer: rank}}] after each truncation that changed a rank."""
        return self.history.entries

    # ------------------------------------------------------------------ checks
    def check_optimizer(self, optimizer, adapters):
        for name, a in adapters:
            check_basis_manifolds(self.name, name, a)
            if a.S.dim() != 2:
                raise ConfigError(f"rank controller 'geolora' needs a full core S (its augmented core "
                                  f"is not diagonal), but the adapter on {name!r} has diag_s=True: "
                                  "use diag_s=False")
            manifolds = a.factor_manifolds()
            flat = [f for f in ("U", "V") if f in manifolds and manifolds[f].is_euclidean]
            if self.train_bases and flat:
                raise ConfigError(
                    f"rank controller 'geolora' with train_bases=True lets the optimizer step U and V, "
                    f"but the adapter on {name!r} has {', '.join(flat)} on the euclidean manifold, which "
                    "does not keep them orthonormal: put U and V on 'stiefel' (method='stella') or "
                    "pass train_bases=False (method='geolora')")
        budget = self.total_budget(adapters)
        if budget is not None and budget < self.r_min * len(adapters):
            raise ConfigError(f"geolora budget={budget} is below r_min × layers = {self.r_min} × "
                              f"{len(adapters)}: raise the budget or lower r_min")

    def layer_max(self, adapter: Adapter) -> int:
        m, n = adapter.shape
        cap = 2 * initial_rank(adapter) if self.r_max is None else self.r_max
        return min(cap, m, n)

    def total_budget(self, adapters) -> int | None:
        """The total rank truncation keeps at most: Σ r₀ for "initial", the int, or None."""
        return sum(initial_rank(a) for _, a in adapters) if self.budget == "initial" else self.budget

    # ------------------------------------------------------------------ the two hooks
    def _phase(self, t: int) -> tuple[bool, bool]:
        """(augment, truncate) at optimizer step t (1-based); the run's last step (`total_steps`)
        truncates and does not augment, so the trained adapter ends within the budget."""
        if t == self.total_steps:
            return False, True
        return (t - 1) % self.period == 0, t % self.period == 0

    def before_step(self, step, adapters, optimizer):
        self.history.start({n: a.rank for n, a in adapters})
        augmenting, _ = self._phase(step + 1)
        self._captured = {}
        # the optimizer moves S, and (train_bases) rewrites U's and V's gradients in place
        keep = (lambda t: t.detach().clone()) if self.train_bases else (lambda t: t.detach())
        for _, a in adapters:
            if augmenting and a.U.grad is not None and a.V.grad is not None:
                self._captured[id(a)] = (keep(a.U.grad), keep(a.V.grad), a.S.detach().clone())
            if not self.train_bases:
                a.U.grad = None  # the optimizer and the geometric stages leave U, V alone
                a.V.grad = None

    @torch.no_grad()
    def step(self, step, adapters, optimizer):
        augmenting, truncating = self._phase(step)
        captured, self._captured = self._captured, {}
        if not (augmenting and captured) and not truncating:
            return None
        # per layer: candidate (U, S, V) and the (old rank, candidate rank) map of coordinates
        cand: dict[str, Candidate] = {}
        if augmenting:
            lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
            cand = self._augment(adapters, captured, lrs)
        maps = {name: (c.emb, c.emb) for name, c in cand.items()}
        if truncating:
            cand, maps = self._truncate(adapters, cand)
        if not cand:
            return None
        # new entries of S (an augmentation's rows and columns r:) start with the mean second moment
        seed = {"S": "mean"} if augmenting and not truncating and self.seed_moments else None
        optimizer.resize_many([
            RankChange(name, c.u.shape[-1], basis={"U": (pu,), "S": (pu, pv), "V": (pv,)},
                       values={"U": c.u, "S": c.s, "V": c.v}, new_second_moments=seed)
            for name, c in cand.items() for pu, pv in [maps[name]]])
        if truncating:
            self.history.record(step, {n: a.rank for n, a in adapters})
            self._guard(step, adapters)
        return {name: c.u.shape[-1] for name, c in cand.items()}

    def _guard(self, step: int, adapters) -> None:
        """Log once (WARNING, `geopeft.ranks`) a total rank above the budget — Σ r₀ without
        one — and once a layer at full rank min(m, n): the adapter is no longer low-rank."""
        total, budget = sum(a.rank for _, a in adapters), self.total_budget(adapters)
        limit = budget if budget is not None else sum(initial_rank(a) for _, a in adapters)
        if total > limit and "total" not in self._warned:
            self._warned.add("total")
            logger.warning("geolora: total rank %d after the truncation at step %d is above %s %d over %d "
                           "layers; largest layer rank %d. Bound it with budget= or r_max=", total, step,
                           "the budget" if budget is not None else "the initial total rank", limit,
                           len(adapters), max(a.rank for _, a in adapters))
        full = [(n, a.rank) for n, a in adapters if a.rank >= min(a.shape)]
        if full and "full" not in self._warned:
            self._warned.add("full")
            logger.warning("geolora: %d layer(s) at full rank min(m, n) after step %d, e.g. %s at rank %d: "
                           "no longer a low-rank adapter. Set r_max= (default 2 × the initial rank)",
                           len(full), step, *full[0])

    # ------------------------------------------------------------------ the batched math
    def _augment(self, adapters, captured, lrs) -> dict[str, Candidate]:
        """Augmented bases and cores, one QR per basis stack and one SVD of S per shape."""
        groups: dict[tuple, list[tuple[str, Adapter]]] = defaultdict(list)
        for name, a in adapters:
            if id(a) in captured and self.layer_max(a) > a.rank:
                groups[(a.shape, a.rank, a.U.dtype, a.U.device)].append((name, a))
        out = {}
        for (_, r, *_), members in groups.items():
            s_pre = stack_fp32([captured[id(a)][2] for _, a in members])
            live = s_pre.flatten(1).abs().amax(1) > 0  # a zero core: G_U = G_V = 0, nothing to add
            if not bool(live.all()):
                members = [m for m, ok in zip(members, live.tolist()) if ok]
                s_pre = s_pre[live]
            if not members:
                continue
            ads = [a for _, a in members]
            new_rank = min(2 * r, self.layer_max(ads[0]))
            gu, gv = (stack_fp32([captured[id(a)][i] for a in ads]) for i in range(2))
            gk, gl = basis_directions(gu, gv, s_pre, self.damping)
            lr = torch.tensor([float(lrs.get(id(a.S), 0.0)) for a in ads], dtype=gu.dtype, device=gu.device)
            u_hat, s_hat, v_hat = augment(stack_fp32([a.U for a in ads]), stack_fp32([a.S for a in ads]),
                                          stack_fp32([a.V for a in ads]), gk, gl, lr, new_rank)
            emb = torch.eye(r, new_rank, dtype=gu.dtype, device=gu.device)
            for i, (name, _) in enumerate(members):
                out[name] = Candidate(u_hat[i], s_hat[i], v_hat[i], emb)
        return out

    def _truncate(self, adapters, cand):
        """SVD of every (candidate) core, batched by shape; new ranks by τ, the clip and the
        budget. Returns the truncated candidates and each one's (U-side, V-side) maps from
        the adapter's current rank coordinates."""
        groups: dict[tuple, list[tuple[str, Candidate]]] = defaultdict(list)
        limits = {}
        for name, a in adapters:
            c = cand.get(name) or Candidate(*(working(f) for f in (a.U, a.S, a.V)),
                                            torch.eye(a.rank, dtype=working(a.U).dtype, device=a.U.device))
            groups[(a.shape, c.u.shape[-1], c.u.device)].append((name, c))
            limits[name] = (self.layer_max(a), a.scaling)
        cuts = []
        for members in groups.values():
            p, sig, q = core_svd(torch.stack([c.s for _, c in members]))
            r = sig.shape[-1]
            hi = torch.tensor([min(limits[n][0], r) for n, _ in members], device=sig.device)
            lo = torch.clamp(torch.full_like(hi, self.r_min), max=r)
            keep = torch.minimum(torch.maximum(tolerance_ranks(sig, self.tau), lo), hi)
            scale = torch.tensor([limits[n][1] for n, _ in members], dtype=sig.dtype, device=sig.device)
            cuts.append((members, p, sig, q, keep, lo, scale))
        budget = self.total_budget(adapters)
        if budget is not None:
            self._apply_budget(cuts, budget)
        out, maps = {}, {}
        for members, p, sig, q, keep, _, _ in cuts:
            u = torch.stack([c.u for _, c in members])
            v = torch.stack([c.v for _, c in members])
            up, vq = u @ p.to(u.dtype), v @ q.to(v.dtype)
            for i, (name, c) in enumerate(members):
                k = int(keep[i])
                out[name] = Candidate(up[i, :, :k], torch.diag(sig[i, :k]).to(u.dtype), vq[i, :, :k], c.emb)
                emb = c.emb.to(p.dtype)
                maps[name] = ((emb @ p[i, :, :k]).to(u.dtype), (emb @ q[i, :, :k]).to(u.dtype))
        return out, maps

    def _apply_budget(self, cuts, budget: int) -> None:
        """Each layer keeps its r_min directions; the rest of the budget goes to the largest
        s·σ over all layers, each within its τ and r_max limits (`keep` updated in place)."""
        values, base = [], 0
        for _, _, sig, _, keep, lo, scale in cuts:
            idx = torch.arange(sig.shape[-1], device=sig.device)
            allowed = (idx >= lo[:, None]) & (idx < keep[:, None])
            values.append(torch.where(allowed, scale[:, None] * sig, torch.full_like(sig, -1.0)).flatten())
            base += int(lo.sum())
        flat = torch.cat(values)
        extra = max(0, min(budget - base, int((flat >= 0).sum())))
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        if extra:
            chosen[flat.topk(extra).indices] = True
        offset = 0
        for _, _, sig, _, keep, lo, _ in cuts:
            n = sig.numel()
            keep.copy_(lo + chosen[offset:offset + n].view(sig.shape).sum(-1))
            offset += n

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"rank_history": self.history.state_dict()}

    def load_state_dict(self, state) -> None:
        self.history.load_state_dict(state.get("rank_history", []))

    def options(self) -> dict[str, Any]:
        return {"tau": self.tau, "r_min": self.r_min, "r_max": self.r_max, "period": self.period,
                "budget": self.budget, "train_bases": self.train_bases, "damping": self.damping,
                "total_steps": self.total_steps}


def initial_rank(adapter: Adapter) -> int:
    """r₀, the rank the adapter was created with: its scale is fixed at α/r₀ (α/√r₀ with rslora)."""
    ratio = adapter.alpha / adapter.scaling
    return max(1, round(ratio * ratio if adapter.rslora else ratio))


def working(t: Tensor) -> Tensor:
    """`t` detached, in float32 — or float64, kept (a float64 model keeps float64 factors)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class Candidate:
    """A layer's factors at some rank k — U (m, k), S (k, k), V (n, k), float32 or float64 — and `emb`,
    the (old rank, k) map from the adapter's current rank coordinates to these."""

    u: Tensor
    s: Tensor
    v: Tensor
    emb: Tensor
