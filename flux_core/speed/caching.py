"""Step caching for the FLUX transformer: skip the block stack on some sampling steps and forecast it.

How it works, per sampling step (one call of the wrapped model):

1. **Decide cheaply.** The embeddings and the first double block always run. The change of that block's
   image residual ``r1 = block0(img) - img`` against ``r1`` at the last *fully computed* step,
   ``mean|r1 - r1_ref| / mean|r1_ref|`` (the First Block Cache criterion), says how far the model has
   moved since the cache was filled.
2. **Plan within a budget.** `StepPlanner` turns that change into compute/forecast decisions: warm-up
   steps and final steps are always computed; a step whose change exceeds the threshold is computed if
   the budget allows it; after `max_consecutive_skips` forecasts in a row the next step is computed no
   matter what. The budget (full evaluations per image) is enforced by construction, not by hope: an
   adaptive compute is only granted when enough budget remains for every compute the cap will still
   force, and the spending is paced evenly over the middle steps (see `StepPlanner`).
3. **Forecast instead of reuse.** On a full step the residual of the rest of the stack
   ``R = out_img - h1_img`` (image tokens after the last single block minus after the first double
   block) is stored with its time t. On a skipped step ``R(t)`` is extrapolated from the last stored
   residuals with Newton's divided differences over t (the exact polynomial through those points, so
   the uneven spacing of the shifted schedule is handled), added to the fresh first block output, and
   the final layer runs with the current conditioning. Order 0 is plain reuse (First Block Cache /
   FORA); orders 1 and 2 are TaylorSeer-style forecasts. With ``probe_order`` the order is picked per
   step: the first block's residual, known fresh, is forecast from its own history with each order,
   and the order that predicts it best is used for the rest of the stack. On a smooth trajectory that
   is the highest order; on an erratic one it falls back to plain reuse instead of overshooting.

State is per sampling run and is reset at the first step of a run: when the call count reaches the
planned number of steps, when t goes up, or when the batch or token shapes change. Everything is
deterministic: the same inputs give the same decisions and the same outputs.

A threshold of 0 turns caching off: every call goes straight to the model, bit for bit the reference.
A threshold of ``math.inf`` never asks for an adaptive compute: the pattern is then the fixed one set
by warm-up, the consecutive-skip cap and the final steps (useful for comparisons at a fixed pattern).

Memory: the history holds up to 3 pairs of float32 image-token tensors, (batch, tokens, hidden) each;
for one 1024x1024 image on FLUX.1 [dev] that is 6 x 50 MB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .settings import REFERENCE_STEPS, StepCacheConfig  # noqa: F401 (re-exported: the cache's settings)


# ----------------------------------------------------------------------------------------------------
# The plan: which steps may be skipped, within a budget


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def min_computes(steps: int, run: int, cap: int) -> int:
    """Fewest full steps among the next `steps` middle steps when `run` forecasts were just made in a row
    and at most `cap` may be made in a row (the final steps, always computed, end the last run)."""
    free = cap - run  # forecasts still allowed before a compute is due
    if steps <= free:
        return 0
    rest = steps - free - 1  # after the compute that is due
    return 1 + _ceil_div(max(0, rest - cap), cap + 1)


@dataclass(frozen=True)
class StepPlan:
    """The limits of one sampling run, derived from a config and a step count."""

    num_steps: int
    warmup: int
    final: int
    budget: int          # full evaluations allowed (per image)
    max_skips: int       # effective cap on consecutive forecasts

    @property
    def middle(self) -> int:
        return self.num_steps - self.warmup - self.final

    @classmethod
    def build(cls, config: StepCacheConfig, num_steps: int) -> "StepPlan":
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1; got {num_steps}")
        warmup = min(config.warmup_steps, num_steps)
        final = min(config.final_steps, num_steps - warmup)
        budget = num_steps
        if config.budget_at_28 is not None:
            scaled = _ceil_div(config.budget_at_28 * num_steps, REFERENCE_STEPS)
            budget = min(num_steps, max(warmup + final, scaled))
        middle = num_steps - warmup - final
        cap = config.max_consecutive_skips
        # The budget is the promise; if the cap would need more computes than it allows, loosen the cap
        # (only as far as needed). The presets never need this at 19 steps or more.
        while warmup + final + min_computes(middle, 0, cap) > budget:
            cap += 1
        return cls(num_steps, warmup, final, budget, cap)


class StepPlanner:
    """Decides, step by step, whether to compute or forecast; guarantees the plan's limits.

    Rules for a middle step j (0-based among the steps between warm-up and final):
      * `max_skips` forecasts in a row -> compute ("cap");
      * change > threshold -> compute ("change") if both hold:
          - feasible: used + 1 + min_computes(rest) + final <= budget, so every compute the cap will
            force later, and the final steps, still fit;
          - paced: middle computes so far + 1 <= round(extra * (j + 1) / middle), where extra is the
            budget left after warm-up and final steps. Unused allowance carries forward, so quiet
            stretches bank computes for busy ones, while a criterion that always fires yields an even,
            FORA-like pattern instead of spending everything at the start;
        otherwise forecast ("budget");
      * change <= threshold -> forecast ("below threshold").
    Invariant: used + min_computes(remaining middle, run) + final <= budget holds after every step, so
    the budget and the cap are both met whatever the criterion says.
    """

    def __init__(self, plan: StepPlan, threshold: float):
        self.plan, self.threshold = plan, threshold
        self.used = 0   # full steps so far
        self.run = 0    # forecasts in a row so far

    def decide(self, step: int, change: float | None) -> tuple[bool, str]:
        p = self.plan
        if step < p.warmup:
            full, reason = True, "warm-up"
        elif step >= p.num_steps - p.final:
            full, reason = True, "final"
        else:
            j = step - p.warmup
            rest = p.middle - j - 1  # middle steps after this one
            if self.run >= p.max_skips:
                full, reason = True, "cap"
            elif change is None or change > self.threshold:
                extra = p.budget - p.warmup - p.final
                allowance = (2 * extra * (j + 1) + p.middle) // (2 * p.middle)  # round half up, in integers
                feasible = self.used + 1 + min_computes(rest, 0, p.max_skips) + p.final <= p.budget
                paced = self.used - p.warmup + 1 <= allowance
                full, reason = (True, "change") if feasible and paced else (False, "budget")
            else:
                full, reason = False, "below threshold"
        if full:
            self.used += 1
            self.run = 0
        else:
            self.run += 1
        return full, reason


def plan_pattern(config: StepCacheConfig, num_steps: int, changes=None) -> str:
    """The decisions as a string ('F' full, '.' forecast) for given per-step changes (default: the
    criterion always fires, the worst case for the budget). Pure: no model involved."""
    planner = StepPlanner(StepPlan.build(config, num_steps), config.threshold)
    out = []
    for i in range(num_steps):
        change = math.inf if changes is None else changes[i]
        out.append("F" if planner.decide(i, change)[0] else ".")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------
# Forecasting


def forecast(history: list[tuple[float, Tensor]], t: float, order: int) -> Tensor:
    """Extrapolate a feature to time t from (t_k, value_k) pairs, most recent last.

    Newton's divided differences over the last min(order, len-1) + 1 points: order 0 returns the last
    value, order 1 the line through the last two, order 2 the parabola through the last three.
    """
    pts = history[-(min(order, len(history) - 1) + 1):]
    ts = [p[0] for p in pts]
    coeffs = [p[1] for p in pts]  # becomes the divided-difference table's top edge
    n = len(pts)
    for level in range(1, n):
        coeffs = coeffs[:level] + [(coeffs[k] - coeffs[k - 1]) / (ts[k] - ts[k - level]) for k in range(level, n)]
    # Horner on the Newton form: coeffs[k] multiplies (t - ts[0]) ... (t - ts[k-1]).
    result = coeffs[n - 1]
    for k in range(n - 2, -1, -1):
        result = coeffs[k] + (t - ts[k]) * result
    return result


# ----------------------------------------------------------------------------------------------------
# The wrapper


@dataclass
class StepDecision:
    step: int             # 0-based step index in the run
    t: float
    full: bool            # True: the whole transformer ran; False: forecast
    reason: str           # warm-up / final / cap / change / budget / below threshold / off
    change: float | None  # the criterion (None before the cache holds a reference)
    order: int | None = None  # forecast order used on a skipped step


@dataclass
class _RunState:
    shape: tuple
    planner: StepPlanner | None
    step: int = 0
    last_t: float = math.inf
    history: list[tuple[float, Tensor, Tensor]] = field(default_factory=list)  # (t, rest residual, r1)
    ids: tuple | None = None
    pe: Tensor | None = None


def relative_l1(a: Tensor, ref: Tensor) -> float:
    """mean |a - ref| / mean |ref|, in float32: the change signal between steps."""
    ref = ref.float()
    return ((a.float() - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)).item()


def best_forecast_order(probes: list[tuple[float, Tensor]], t: float, probe: Tensor, max_order: int) -> int:
    """The forecast order whose extrapolation of the first block's residual history `probes` lands closest
    to the fresh residual `probe` at t.

    The first block sees the same conditioning drift as the rest of the stack, so how well each order
    extrapolates its residual is a cheap, per-step test of how well it will extrapolate the rest: a smooth
    trajectory gets the highest order, an erratic one plain reuse."""
    probe = probe.float()
    errors = torch.stack([(forecast(probes, t, order) - probe).abs().mean()
                          for order in range(min(max_order, len(probes) - 1) + 1)])
    return int(torch.argmin(errors))  # the first of equal minima: ties go to the lower order


class StepCache:
    """A Flux model with step caching; same call signature as Flux.forward.

    ``StepCache(model, config, num_steps=28)`` then pass it to sampling.denoise in place of the model.
    After a run, ``decisions`` lists what happened at every step and ``full_evaluations`` counts the
    steps on which the whole transformer ran (per image: a step evaluates the whole batch at once).
    """

    def __init__(self, model, config: StepCacheConfig, num_steps: int | None = None):
        for part in ("embed", "positions", "run_blocks", "double_blocks", "final_layer"):
            if not hasattr(model, part):
                raise TypeError(f"step caching needs a flux_core Flux transformer; {type(model).__name__} "
                                f"has no {part!r}")
        if len(model.double_blocks) < 1:
            raise ValueError("step caching needs at least one double block to decide with")
        self.model, self.config = model, config
        self.num_steps = num_steps
        self.decisions: list[StepDecision] = []
        self._state: _RunState | None = None

    # -- bookkeeping

    def start(self, num_steps: int) -> None:
        """Plan for runs of num_steps steps (also resets the state)."""
        self.num_steps = num_steps
        self.reset()

    def reset(self) -> None:
        self._state = None
        self.decisions = []

    @property
    def full_evaluations(self) -> int:
        return sum(d.full for d in self.decisions)

    @property
    def plan(self) -> StepPlan | None:
        return self._state.planner.plan if self._state and self._state.planner else None

    def pattern(self) -> str:
        return "".join("F" if d.full else "." for d in self.decisions)

    def summary(self) -> dict:
        """Compact, JSON-able record of the last run (for logs and image metadata)."""
        return {"full_evaluations": self.full_evaluations, "steps": len(self.decisions), "pattern": self.pattern()}

    # -- the call

    def __call__(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None = None) -> Tensor:
        if self.config.enabled and self.num_steps is None:
            raise ValueError("StepCache needs the number of sampling steps: pass num_steps= or call start()")
        t = float(timesteps.reshape(-1)[0])
        s = self._begin_step(t, (tuple(img.shape), tuple(txt.shape), img.dtype, img.device))
        if not self.config.enabled:  # off: the model itself, bit for bit
            self.decisions.append(StepDecision(s.step, t, True, "off", None))
            s.step += 1
            return self.model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y,
                              guidance=guidance)
        with torch.no_grad():
            return self._cached_call(s, t, img, img_ids, txt, txt_ids, timesteps, y, guidance)

    def _begin_step(self, t: float, shape: tuple) -> _RunState:
        """The state of the run this call belongs to; a fresh one at the first step of a run."""
        s = self._state
        done = s is not None and self.num_steps is not None and s.step >= self.num_steps
        if s is None or s.shape != shape or t > s.last_t or done:
            self.decisions = []
            planner = None
            if self.config.enabled:
                planner = StepPlanner(StepPlan.build(self.config, self.num_steps), self.config.threshold)
            s = self._state = _RunState(shape=shape, planner=planner)
        s.last_t = t
        return s

    def _choose_order(self, history, t: float, r1: Tensor) -> int:
        return best_forecast_order([(h[0], h[2]) for h in history], t, r1, self.config.forecast_order)

    def _cached_call(self, s: _RunState, t: float, img, img_ids, txt, txt_ids, timesteps, y, guidance) -> Tensor:
        model = self.model
        # Flux.forward, split after the first double block (embed -> positions -> run_blocks -> final_layer).
        h, txt_h, vec = model.embed(img, txt, timesteps, y, guidance)
        if s.pe is None or s.ids[0] is not img_ids or s.ids[1] is not txt_ids:
            s.ids = (img_ids, txt_ids)
            s.pe = model.positions(img_ids, txt_ids)
        pe = s.pe
        h1, txt_h = model.double_blocks[0](h, txt_h, vec, pe)
        r1 = h1 - h

        change = relative_l1(r1, s.history[-1][2]) if s.history else None
        full, reason = s.planner.decide(s.step, change)  # step 0 is always warm-up: history is never empty
        decision = StepDecision(s.step, t, full, reason, change)
        self.decisions.append(decision)
        s.step += 1

        if full:
            out_img = model.run_blocks(h1, txt_h, vec, pe, first_double=1)
            s.history.append((t, (out_img - h1).float(), r1.float()))
            del s.history[:-(self.config.forecast_order + 1)]
        else:
            order = self._choose_order(s.history, t, r1) if self.config.probe_order else self.config.forecast_order
            decision.order = min(order, len(s.history) - 1)
            residual = forecast([(p[0], p[1]) for p in s.history], t, order)
            out_img = (h1.float() + residual).to(h1.dtype)
        return model.final_layer(out_img, vec)
