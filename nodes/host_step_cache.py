"""Step caching for a host MODEL: the engine's planner and forecasts (flux_core.speed.caching), attached
through the host's public extension points. No host function is copied, replaced or monkeypatched.

How it hooks in (ComfyUI 0.3.75 names):

* ``patches_replace["dit"]`` entries for every block of the host's own FLUX transformer
  (comfy.ldm.flux.model.Flux calls them in place of its blocks). The first double block always runs;
  its image residual ``r1 = block0(img) - img`` is the change signal, as in the engine. On a full call
  every block runs and the last block stores the residual of the rest of the stack,
  ``R = img after the last block - img after the first``, with the call's sigma. On a skipped call the
  other blocks hand their input back untouched and the last one returns ``h1 + forecast(R)``; the host's
  own final layer and unpatchify finish the call. A skipped step costs the embeddings, one block and the
  final layer, so the results match the engine's StepCache, which splits its own forward the same way.
* a ``DIFFUSION_MODEL`` wrapper around every model call: which step it belongs to (from the run's sigma
  schedule, so every scheduler and sampler works, second-order ones included), which batch it is
  (cond/uncond: each keeps its own history, all follow the step's decision), and whether all our block
  patches are still in place (if a later node replaced one, the call runs in full, never half-skipped).
* an ``OUTER_SAMPLE`` wrapper around every sampling run: a fresh plan for the run's step count (budgets
  scale with it), and at the end the count of full evaluations, logged, kept in ``last_run`` and recorded
  for the image metadata of the running prompt (``prompt_metadata``), with the node's runtime choices
  (``acceleration``, host_compile).

Outside a sampling run (no OUTER_SAMPLE around the call) the model runs unchanged.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..flux_core.speed.caching import (StepCacheConfig, StepPlan, StepPlanner, best_forecast_order, forecast,
                                       relative_l1)

LOG = logging.getLogger("flux_juiced.speed")
KEY = "flux_juiced_step_cache"  # wrapper key; also marks our block patches
TITLE = "FLUX.1 Speed Mode (Juiced)"


# ----------------------------------------------------------------------------------------------------
# what the host must offer


def unsupported(model) -> str | None:
    """Why step caching cannot attach to this MODEL on this host, or None when it can."""
    try:
        from comfy.patcher_extension import WrappersMP
    except ImportError:
        return "this ComfyUI has no comfy.patcher_extension (model wrappers)"
    missing = [n for n in ("OUTER_SAMPLE", "DIFFUSION_MODEL") if not hasattr(WrappersMP, n)]
    missing += [n for n in ("clone", "add_wrapper_with_key", "remove_wrappers_with_key", "set_model_patch_replace",
                            "get_model_object") if not hasattr(model, n)]
    if missing:
        return f"this ComfyUI lacks {', '.join(missing)}"
    return None


def block_keys(model) -> list[tuple[str, int]]:
    """The transformer's block keys in run order; ValueError if the MODEL is not a host FLUX transformer."""
    net = model.get_model_object("diffusion_model")
    double, single = getattr(net, "double_blocks", None), getattr(net, "single_blocks", None)
    if double is None or single is None or not hasattr(net, "forward_orig"):
        raise ValueError(f"{TITLE} needs a FLUX.1 MODEL on ComfyUI's own FLUX transformer (this pack's loader or "
                         f"UNETLoader); got {type(net).__name__}")
    keys = [("double_block", i) for i in range(len(double))] + [("single_block", i) for i in range(len(single))]
    if not double or len(keys) < 2:
        raise ValueError(f"{TITLE} needs at least one double block and one more block; got {len(keys)} blocks")
    return keys


# ----------------------------------------------------------------------------------------------------
# run state


@dataclass
class _Entry:  # one fully computed call of one batch
    t: float
    rest: torch.Tensor   # R, float32
    probe: torch.Tensor  # r1, float32


@dataclass
class _Step:
    full: bool
    reason: str
    change: float | None


class _Run:
    """One sampling run: its plan, the decision of each step, and the history of each batch."""

    def __init__(self, config: StepCacheConfig, sigmas):
        self.schedule = [float(s) for s in sigmas.reshape(-1).tolist()] if sigmas is not None else []
        self.num_steps = max(1, len(self.schedule) - 1)
        self.planner = StepPlanner(StepPlan.build(config, self.num_steps), config.threshold)
        self.steps: dict[int, _Step] = {}
        self.history: dict[tuple, list[_Entry]] = {}
        self.calls = self.full_calls = 0
        self.problems: set[str] = set()

    def step_of(self, sigma: float) -> int:
        """The step a call at this sigma belongs to: the last schedule entry at or above it (a second-order
        sampler's in-between sigma belongs to the step it started from)."""
        tol = 1e-5 * max(1.0, abs(sigma))
        step = 0
        for i, s in enumerate(self.schedule[:-1]):
            if s + tol < sigma:
                break
            step = i
        return step


@dataclass
class _Call:
    run: _Run
    step: int
    t: float
    batch: tuple
    may_skip: bool
    seen: bool = False         # the first block's patch ran
    full: bool = True
    txt_len: int = 0
    h1: torch.Tensor | None = None
    probe: torch.Tensor | None = None
    rest: torch.Tensor | None = None  # stored residual (full call) or its forecast (skipped call)


def _run_block(previous, args, extra):
    """The block itself, or the patch that held this key before ours (chained, not dropped)."""
    return previous(args, extra) if previous is not None else extra["original_block"](args)


# ----------------------------------------------------------------------------------------------------
# the cache


class HostStepCache:
    """Step caching for one patched MODEL (shared by its clones; ComfyUI runs one sampling at a time).

    ``attach(model_patcher)`` installs it on a clone; after each sampling run ``last_run`` holds
    {"speed_mode", "steps", "full_evaluations", "pattern", "model_calls", "full_model_calls"}; the node sets
    ``acceleration`` (the runtime choices), saved with each run's metadata.
    """

    def __init__(self, mode_name: str, config: StepCacheConfig, short_name: str | None = None):
        if not config.enabled:
            raise ValueError("a step cache with threshold 0 is off: leave the MODEL unpatched instead")
        self.mode, self.config = mode_name, config
        self.short_name = short_name or mode_name
        self.last_run: dict | None = None
        self.acceleration: dict | None = None  # the runtime choices (host_compile.accelerate), set by the node
        self.last_steps: list = []  # the last run's decision per step (full, reason, change), for tests and logs
        self._run: _Run | None = None
        self._call: _Call | None = None
        self._installed: dict[tuple, object] = {}
        self._warned: set[str] = set()

    # -- installing

    def attach(self, model) -> None:
        """Install on `model` (a ModelPatcher the caller has cloned)."""
        from comfy.patcher_extension import WrappersMP

        keys = block_keys(model)
        for kind, wrapper in ((WrappersMP.OUTER_SAMPLE, self._outer_sample),
                              (WrappersMP.DIFFUSION_MODEL, self._diffusion_model)):
            model.remove_wrappers_with_key(kind, KEY)  # a second speed node replaces the first
            model.add_wrapper_with_key(kind, KEY, _plain(wrapper))
        existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        self._installed = {}
        for index, key in enumerate(keys):
            previous = existing.get(key)
            if getattr(previous, KEY, False):  # ours from an earlier speed node: replace it, keep what it chained
                previous = previous.flux_juiced_previous
            role = "first" if index == 0 else "last" if index == len(keys) - 1 else "middle"
            patch = self._block_patch(role, key[0], previous)
            model.set_model_patch_replace(patch, "dit", key[0], key[1])
            self._installed[key] = patch

    def _block_patch(self, role: str, kind: str, previous):
        # Plain closures: ModelPatcher.clone() deep-copies model_options, which copies a bound method's
        # object but shares a function, so every clone keeps feeding this one cache.
        if role == "first":
            def patch(args, extra):
                call = self._call
                if call is None:
                    return _run_block(previous, args, extra)
                img = args["img"]
                out = _run_block(previous, dict(args, img=img.clone()), extra)  # blocks add to their input
                call.seen = True
                self._decide(call, out, img)
                return out
        elif role == "middle":
            def patch(args, extra):
                call = self._call
                if call is not None and call.seen and not call.full:
                    return {k: args[k] for k in (("img", "txt") if kind == "double_block" else ("img",))}
                return _run_block(previous, args, extra)
        else:
            def patch(args, extra):
                call = self._call
                if call is None or not call.seen or not call.may_skip:
                    return _run_block(previous, args, extra)
                img, start = args["img"], (call.txt_len if kind == "single_block" else 0)
                if call.full:
                    out = _run_block(previous, args, extra)
                    call.rest = out["img"][:, start:].float() - call.h1
                    return out
                tokens = (call.h1 + call.rest).to(img.dtype)
                out = {"img": torch.cat((img[:, :start], tokens), dim=1) if start else tokens}
                if kind == "double_block":
                    out["txt"] = args["txt"]
                return out
        setattr(patch, KEY, True)
        patch.flux_juiced_previous = previous
        return patch

    # -- per sampling run

    def _outer_sample(self, executor, *args, **kwargs):
        sigmas = kwargs["sigmas"] if "sigmas" in kwargs else args[3]
        outer, run = self._run, _Run(self.config, sigmas)
        self._run = run
        try:
            result = executor(*args, **kwargs)
        finally:
            self._run = outer
        self._finish(run)
        return result

    def _finish(self, run: _Run) -> None:
        pattern = "".join(("F" if run.steps[i].full else ".") if i in run.steps else "-"
                          for i in range(run.num_steps))
        full = sum(step.full for step in run.steps.values())
        if not run.calls:
            full = None  # the model was never called through the host's FLUX forward: nothing to count
            run.problems.add("the model never went through ComfyUI's FLUX forward (its DIFFUSION_MODEL wrappers "
                             "did not run): nothing was cached")
        self.last_steps = [run.steps.get(i) for i in range(run.num_steps)]
        self.last_run = {"speed_mode": self.mode, "steps": run.num_steps, "full_evaluations": full,
                         "pattern": pattern, "model_calls": run.calls, "full_model_calls": run.full_calls}
        record_run(self.last_run, self.acceleration)
        LOG.info("%s [%s]: %s of %d steps evaluated in full (%s), %d of %d model calls", TITLE, self.short_name,
                 full, run.num_steps, pattern, run.full_calls, run.calls)
        for problem in sorted(run.problems - self._warned):
            self._warned.add(problem)
            LOG.warning("%s [%s]: %s", TITLE, self.short_name, problem)

    # -- per model call

    def _diffusion_model(self, executor, x, timestep, *args, **kwargs):
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None)
        run = self._run
        if run is None or self._call is not None or not isinstance(options, dict):
            return executor(x, timestep, *args, **kwargs)  # not inside a sampling run: the plain model
        sigmas = options.get("sigmas")
        t = float((sigmas if sigmas is not None else timestep).reshape(-1)[0])
        batch = (tuple(options.get("uuids") or options.get("cond_or_uncond") or ()), tuple(x.shape))
        call = _Call(run, run.step_of(t), t, batch, may_skip=self._patches_in_place(options))
        if not call.may_skip:
            run.problems.add("another node replaced some of this node's block patches after it: those steps "
                             "ran in full (put the speed node last in the MODEL chain)")
        self._call = call
        try:
            out = executor(x, timestep, *args, **kwargs)
        finally:
            self._call = None
        run.calls += 1
        if not call.seen:
            run.problems.add("the model never ran the block patches (not ComfyUI's own FLUX forward?): every "
                             "step ran in full")
            run.steps.setdefault(call.step, _Step(True, "unpatched", None))
        if call.full:
            run.full_calls += 1
            if call.seen and call.may_skip and call.rest is not None:
                self._remember(run, call)
        return out

    def _patches_in_place(self, options: dict) -> bool:
        blocks = options.get("patches_replace", {}).get("dit", {})
        return all(blocks.get(key) is patch for key, patch in self._installed.items())

    def _decide(self, call: _Call, out: dict, img: torch.Tensor) -> None:
        """At the first block: compute or forecast this call (the step's decision is made by its first call)."""
        run = call.run
        if not call.may_skip:
            run.steps.setdefault(call.step, _Step(True, "patches replaced", None))
            return
        h1 = out["img"]
        probe = (h1 - img).float()
        history = run.history.get(call.batch)
        if history and history[-1].probe.shape != probe.shape:
            history = run.history[call.batch] = []
        step = run.steps.get(call.step)
        if step is None:
            change = relative_l1(probe, history[-1].probe) if history else None
            if call.step < run.num_steps:
                full, reason = run.planner.decide(call.step, change)
            else:
                full, reason = True, "beyond the plan"
            step = run.steps[call.step] = _Step(full, reason, change)
        call.full = step.full or not history  # a batch with nothing cached yet must run
        call.txt_len = out["txt"].shape[1]
        call.h1, call.probe = h1.float(), probe
        if call.h1 is h1:  # float32 model: keep a copy, the next blocks add to this tensor in place
            call.h1 = h1.clone()
        if not call.full:
            order = self.config.forecast_order
            if self.config.probe_order:
                order = best_forecast_order([(e.t, e.probe) for e in history], call.t, probe, order)
            call.rest = forecast([(e.t, e.rest) for e in history], call.t, order)

    def _remember(self, run: _Run, call: _Call) -> None:
        history = run.history.setdefault(call.batch, [])
        if history and history[-1].t == call.t:  # same sigma again (Heun's two calls): keep the later one
            history.pop()
        history.append(_Entry(call.t, call.rest, call.probe))
        del history[:-(self.config.forecast_order + 1)]


def _plain(method):
    """A plain function around a bound method (see HostStepCache._block_patch)."""
    def call(*args, **kwargs):
        return method(*args, **kwargs)
    return call


# ----------------------------------------------------------------------------------------------------
# what the save nodes write: the runs of the prompt being executed

_RUNS_LOCK = threading.Lock()
_PROMPT_RUNS: "OrderedDict[str, list[tuple[dict, dict | None]]]" = OrderedDict()  # (run, acceleration)
_KEEP_PROMPTS = 16


def _prompt_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return getattr(context, "prompt_id", None)


def record_run(summary: dict, acceleration: dict | None = None) -> None:
    prompt_id = _prompt_id()
    if prompt_id is None:
        return
    with _RUNS_LOCK:
        _PROMPT_RUNS.setdefault(prompt_id, []).append((dict(summary), acceleration))
        _PROMPT_RUNS.move_to_end(prompt_id)
        while len(_PROMPT_RUNS) > _KEEP_PROMPTS:
            _PROMPT_RUNS.popitem(last=False)


def prompt_metadata() -> dict:
    """{"evaluations": ..., "step_cache": ..., "acceleration": ...} for the speed-mode runs of the prompt being
    executed ({} if none ran in it): one run gives a number and its summaries, several give lists in run
    order. "acceleration" (the runtime choices) only where the node recorded them."""
    with _RUNS_LOCK:
        entries = list(_PROMPT_RUNS.get(_prompt_id() or "", []))
    if not entries:
        return {}
    runs = [run for run, _ in entries]
    accelerations = [acceleration for _, acceleration in entries]
    if len(runs) == 1:
        meta = {"evaluations": runs[0]["full_evaluations"], "step_cache": runs[0], "acceleration": accelerations[0]}
    else:
        meta = {"evaluations": [r["full_evaluations"] for r in runs], "step_cache": runs,
                "acceleration": accelerations}
    if all(acceleration is None for acceleration in accelerations):
        del meta["acceleration"]
    return meta
