"""Early termination: decide, from the loss trajectories, which running adapters stop.

Rules are small classes in one registry (:data:`RULES`), behind one interface
(:meth:`Monitor.decide`), so they can be compared on the same runs:

- ``asha`` (the default): ASHA-style rungs at ``grace * eta**k`` micro-steps on the exponentially
  smoothed loss; at its k-th rung an adapter continues only if it is in the best ``1/eta`` of every
  adapter that reached that rung (late arrivals are compared with what earlier ones recorded
  there). With ``extrapolate`` (on by default) adapters are ranked by the loss their own curve
  predicts at their last step (a least-squares fit of loss against log(step) over the recent
  smoothed curve), so a late bloomer whose loss still falls fast is kept.
- ``median``: the median stopping rule: every ``check_every`` micro-steps after the grace period,
  stop an adapter whose best smoothed loss is worse than the median of the other adapters'
  running-average losses at the same micro-step.
- ``halving``: plain successive halving on the raw last loss at the same rungs as asha.
- ``none``: never stop early.
- ``alto``: the ALTO paper's detectors, read at every evaluation (held-out losses): divergence (the
  slopes, per evaluation, of the smoothed training loss and of the held-out loss over the last
  ``window`` evaluations both >= ``tau_slope`` for ``patience`` evaluations in a row), overfitting
  (the relative gap (held-out - training) / training >= ``tau_gap`` for ``patience`` evaluations
  in a row: it stops, and its best held-out weights are what it exports), and underperformers (at
  the first evaluation after ``warmup`` of its micro-steps only the best ``keep`` by held-out loss
  go on). Defaults as published: window 2, patience 2, tau_slope 0.001, tau_gap 0.1, warm-up 5%,
  keep 25%. It needs no grace period (patience and warm-up are its own).

Rules combine with ``+`` (``alto+asha``, or a list in the sweep file): an adapter stops when any
of them says so.

The trajectory is the training loss of every micro-step, or (``signal: eval``) a held-out loss
measured every ``eval_every`` micro-steps; grace, rungs and checks then count those points.

Hard guards for every rule: nothing stops before ``grace`` points (except divergence, and the
alto rule's detectors); a diverging adapter (smoothed loss above ``divergence_factor`` times the mean of its first
``DIVERGENCE_BASELINE`` losses: one noisy micro-batch is not a trend) stops at once;
the current best adapter is never stopped and at least ``min_survivors`` keep running (except
that divergence and overfitting stop any adapter: continuing them is waste). Every decision
carries its reason.

(Over 300 lines for a reason: the rules, the checks of their settings and the guards are one
registry, read side by side by bench/quality_study.py; split, a rule's settings would live apart
from its code.)
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from alto.inputs import is_int, is_number
from alto.registry import Adapter

DIVERGENCE_BASELINE = 3  # losses averaged as the starting level


@dataclass(frozen=True)
class MonitorConfig:
    rule: str = "asha"  # one of RULES, or several joined by "+" (a list is joined so)
    grace: int = 8  # micro-steps before any rule may stop an adapter
    eta: float = 2.0  # keep the best 1/eta at each rung
    check_every: int = 4  # median rule: how often (micro-steps) after the grace period
    min_survivors: int = 1
    smoothing: float = 0.3  # weight of the newest loss in the exponential moving average
    divergence_factor: float = 2.0
    extrapolate: bool = True
    # the trajectory read: "train" losses, or "eval" (held-out) losses; None: eval with rule alto, else train
    signal: str | None = None
    eval_every: int = 5  # micro-steps between held-out evaluations (signal "eval")
    window: int = 2  # rule alto: evaluations a slope is fitted over
    patience: int = 2  # rule alto: evaluations in a row a detector must fire
    tau_slope: float = 0.001  # rule alto: rising slope (loss per evaluation) of divergence
    tau_gap: float = 0.1  # rule alto: relative held-out/training gap of overfitting
    warmup: float = 0.05  # rule alto: fraction of its micro-steps before the underperformer cut
    keep: float = 0.25  # rule alto: fraction kept at the underperformer cut

    def __post_init__(self) -> None:
        if isinstance(self.rule, (list, tuple)) and self.rule and all(isinstance(r, str) for r in self.rule):
            object.__setattr__(self, "rule", "+".join(self.rule))
        names = self.rule.split("+") if isinstance(self.rule, str) else []
        if self.signal is None:
            object.__setattr__(self, "signal", "eval" if "alto" in names else "train")
        checks = [  # each type check comes first: `and` stops before a comparison it would break
            (bool(names) and all(n in RULES for n in names) and len(set(names)) == len(names), "rule",
             f"one of {', '.join(RULES)}, or several joined by + (alto+asha)"),
            (is_int(self.grace) and self.grace >= 1, "grace", "an int >= 1"),
            (is_number(self.eta) and 1 < self.eta < math.inf, "eta", "a number > 1"),
            (is_int(self.check_every) and self.check_every >= 1, "check_every", "an int >= 1"),
            (is_int(self.min_survivors) and self.min_survivors >= 1, "min_survivors", "an int >= 1"),
            (is_number(self.smoothing) and 0 < self.smoothing <= 1, "smoothing", "a number in (0, 1]"),
            (is_number(self.divergence_factor) and self.divergence_factor > 1, "divergence_factor",
             "a number > 1"),
            (isinstance(self.extrapolate, bool), "extrapolate", "true or false"),
            (self.signal in ("train", "eval"), "signal", "train or eval"),
            (is_int(self.eval_every) and self.eval_every >= 1, "eval_every", "an int >= 1"),
            (not ("alto" in names and self.signal == "train"), "signal", "eval: rule alto reads held-out losses"),
            (is_int(self.window) and self.window >= 2, "window", "an int >= 2"),
            (is_int(self.patience) and self.patience >= 1, "patience", "an int >= 1"),
            (is_number(self.tau_slope) and math.isfinite(self.tau_slope), "tau_slope", "a finite number"),
            (is_number(self.tau_gap) and math.isfinite(self.tau_gap), "tau_gap", "a finite number"),
            (is_number(self.warmup) and 0 <= self.warmup < 1, "warmup", "a number in [0, 1)"),
            (is_number(self.keep) and 0 < self.keep <= 1, "keep", "a number in (0, 1]"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"monitor.{name}={getattr(self, name)!r} is invalid: {rule}")

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(self.rule.split("+"))


@dataclass(frozen=True)
class Decision:
    adapter: str
    micro_step: int
    rule: str
    reason: str


@dataclass(frozen=True)
class Stop:
    """Why a rule stops an adapter; unconditional stops (divergence, overfitting) skip the guards
    that spare the best adapter and min_survivors."""

    why: str
    unconditional: bool = False


def smoothed(losses: list[float], alpha: float) -> list[float]:
    out: list[float] = []
    for v in losses:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0, 1, 2, ..."""
    mx, my = (len(ys) - 1) / 2, statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sum((x - mx) ** 2 for x in range(len(ys)))


def extrapolate_final(curve: list[float], final_step: int) -> float:
    """Loss at final_step from a least-squares fit of loss = a + b*log(step) over the second half
    of the (smoothed) curve; never below 0."""
    start = len(curve) // 2
    xs = [math.log(i + 1) for i in range(start, len(curve))]
    ys = curve[start:]
    if len(xs) < 2:
        return curve[-1]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return max(0.0, my + b * (math.log(final_step) - mx))


class Rule:
    """One early-termination rule. ``record`` sees every running adapter's new point first (rung
    rules compare simultaneous arrivals), then ``reason`` says why one stops now (None: it goes on).
    Rules with a grace period see an adapter only after ``grace`` points."""

    graced = True

    def __init__(self, name: str):
        self.name = name  # its key in the monitor's rungs

    def record(self, monitor: "Monitor", a: Adapter, curve: list[float], t: int) -> None:
        pass

    def reason(self, monitor: "Monitor", a: Adapter, curves: dict[str, list[float]], running: list[Adapter],
               t: int) -> Stop | None:
        return None

    def cut(self, monitor: "Monitor", a: Adapter, rung: tuple[str, int], keep: int, what: str) -> Stop | None:
        """Stops the adapter unless it is in the best `keep` of every adapter recorded at the rung."""
        scores = monitor.rungs[rung]
        ranked = sorted(scores, key=lambda aid: (scores[aid], aid))  # ties: by id, deterministic
        if ranked.index(a.id) < keep:
            return None
        return Stop(f"{what} {scores[a.id]:.4f} is not in the best {keep} of {len(ranked)} (cut "
                    f"{scores[ranked[keep - 1]]:.4f})")


class Never(Rule):
    """rule none: only the hard guards (divergence) stop adapters."""


class Asha(Rule):
    """ASHA-style rungs at grace * eta**k points: continue only in the best 1/eta of every adapter
    that reached the rung, ranked by the smoothed loss (or, with extrapolate, by the loss its own
    curve predicts at its last step)."""

    def score(self, monitor: "Monitor", a: Adapter, curve: list[float]) -> float:
        c = monitor.config
        if c.extrapolate:
            total = a.config.max_steps * a.config.grad_accum
            final = total // c.eval_every if c.signal == "eval" else total
            return extrapolate_final(curve, max(final, len(curve)))
        return curve[-1]

    def what(self, config: MonitorConfig) -> str:
        return "predicted final loss" if config.extrapolate else "smoothed loss"

    def record(self, monitor: "Monitor", a: Adapter, curve: list[float], t: int) -> None:
        k = monitor.rung_of(t)
        if k is not None:
            monitor.rungs.setdefault((self.name, k), {})[a.id] = self.score(monitor, a, curve)

    def reason(self, monitor: "Monitor", a: Adapter, curves: dict[str, list[float]], running: list[Adapter],
               t: int) -> Stop | None:
        c = monitor.config
        k = monitor.rung_of(t)
        if k is None:
            return None
        keep = max(1, int(len(monitor.rungs[(self.name, k)]) / c.eta))
        what = f"held-out {self.what(c)}" if c.signal == "eval" else self.what(c)
        return self.cut(monitor, a, (self.name, k), keep, f"{self.name} rung {k} ({monitor.unit} {t}): {what}")


class Halving(Asha):
    """Plain successive halving: the same rungs, ranked by the raw last loss."""

    def score(self, monitor: "Monitor", a: Adapter, curve: list[float]) -> float:
        return monitor.points(a)[-1]

    def what(self, config: MonitorConfig) -> str:
        return "loss"


class Median(Rule):
    """The median stopping rule: every check_every points after the grace period, stop an adapter
    whose best smoothed loss is worse than the median of the others' running averages at that point."""

    def reason(self, monitor: "Monitor", a: Adapter, curves: dict[str, list[float]], running: list[Adapter],
               t: int) -> Stop | None:
        c = monitor.config
        if (t - c.grace) % c.check_every:
            return None
        others = [statistics.fmean(monitor.points(o)[:t]) for o in running
                  if o.id != a.id and len(monitor.points(o)) >= t]
        if not others:
            return None
        med = statistics.median(others)
        best = min(curves[a.id])
        if best > med:
            return Stop(f"median rule ({monitor.unit} {t}): best smoothed loss {best:.4f} > median running "
                        f"average {med:.4f}")
        return None


class Alto(Rule):
    """The ALTO paper's detectors (see the module docstring), at every evaluation. The training
    loss at an evaluation is the smoothed training loss of the micro-step it came after."""

    graced = False

    def warmup_point(self, monitor: "Monitor", a: Adapter) -> int | None:
        """The number of evaluations at the adapter's warm-up cut: its first evaluation at or after
        `warmup` of its micro-steps (None: not reached yet)."""
        at = math.ceil(monitor.config.warmup * a.config.max_steps * a.config.grad_accum)
        return next((i + 1 for i, s in enumerate(a.eval_steps) if s >= at), None)

    def record(self, monitor: "Monitor", a: Adapter, curve: list[float], t: int) -> None:
        if self.warmup_point(monitor, a) == t:
            monitor.rungs.setdefault((self.name, 0), {})[a.id] = a.eval_losses[-1]

    def reason(self, monitor: "Monitor", a: Adapter, curves: dict[str, list[float]], running: list[Adapter],
               t: int) -> Stop | None:
        c = monitor.config
        train_curve = smoothed(a.losses, c.smoothing)
        train = [train_curve[s - 1] if s else math.nan for s in a.eval_steps]
        held_out = a.eval_losses
        recent = range(len(held_out) - c.patience, len(held_out))
        if len(held_out) >= c.window + c.patience - 1:
            w = c.window
            rising = [(slope(train[j - w + 1 : j + 1]), slope(held_out[j - w + 1 : j + 1])) for j in recent]
            if all(tr >= c.tau_slope and ho >= c.tau_slope for tr, ho in rising):
                return Stop(f"alto divergence (eval {t}): training and held-out losses rose for {c.patience} "
                            f"evaluations (slopes per evaluation {rising[-1][0]:.4f}, {rising[-1][1]:.4f} >= "
                            f"{c.tau_slope})", unconditional=True)
        if len(held_out) >= c.patience:
            gaps = [(held_out[j] - train[j]) / train[j] if train[j] > 0 else math.nan for j in recent]
            if all(g >= c.tau_gap for g in gaps):
                return Stop(f"alto overfitting (eval {t}): (held-out - training) / training {gaps[-1]:.3f} >= "
                            f"{c.tau_gap} for {c.patience} evaluations (export: best keeps its best held-out weights)",
                            unconditional=True)
        if self.warmup_point(monitor, a) == t:
            keep = max(1, math.ceil(len(monitor.rungs[(self.name, 0)]) * c.keep))
            return self.cut(monitor, a, (self.name, 0), keep, f"alto warm-up (eval {t}, micro-step "
                            f"{a.eval_steps[-1]}): held-out loss")
        return None


RULES: dict[str, type[Rule]] = {"asha": Asha, "median": Median, "halving": Halving, "alto": Alto, "none": Never}


@dataclass
class Monitor:
    config: MonitorConfig = field(default_factory=MonitorConfig)
    rungs: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)  # (rule, rung) -> adapter -> score
    log: list[Decision] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rules = [RULES[name](name) for name in self.config.rules]

    @property
    def unit(self) -> str:
        return "eval" if self.config.signal == "eval" else "micro-step"

    def rung_of(self, point: int) -> int | None:
        """k if the trajectory's point-th value is the k-th rung (grace * eta**k), else None."""
        k, at = 0, self.config.grace
        while at < point:
            k += 1
            at = math.ceil(self.config.grace * self.config.eta**k)
        return k if at == point else None

    def points(self, a: Adapter) -> list[float]:
        """The trajectory the rules read; grace, rungs and checks count its points."""
        return a.eval_losses if self.config.signal == "eval" else a.losses

    def decide(self, running: list[Adapter]) -> list[Decision]:
        """Which of the running adapters stop now (call after every new trajectory point)."""
        c = self.config
        curves = {a.id: smoothed(self.points(a), c.smoothing) for a in running if self.points(a)}
        progress = {a.id: len(self.points(a)) for a in running}
        stops: dict[str, tuple[str, Stop]] = {}  # adapter -> (the rule, why)
        for a in running:
            curve = curves.get(a.id)
            if curve and len(curve) > DIVERGENCE_BASELINE:
                start = statistics.fmean(self.points(a)[:DIVERGENCE_BASELINE])
                if curve[-1] > c.divergence_factor * start:
                    stops[a.id] = (c.rule, Stop(f"diverging: smoothed loss {curve[-1]:.4f} > {c.divergence_factor} "
                                                f"x starting loss {start:.4f}", unconditional=True))
        judged = {rule.name: [a for a in running if a.id in curves and (progress[a.id] >= c.grace or not rule.graced)]
                  for rule in self.rules}
        for rule in self.rules:  # every arrival first: simultaneous ones compete
            for a in judged[rule.name]:
                rule.record(self, a, curves[a.id], progress[a.id])
        for rule in self.rules:
            for a in judged[rule.name]:
                if a.id not in stops and (stop := rule.reason(self, a, curves, running, progress[a.id])):
                    stops[a.id] = (rule.name, stop)
        return self._guard(stops, running, curves)

    def _guard(self, stops: dict[str, tuple[str, Stop]], running: list[Adapter],
               curves: dict[str, list[float]]) -> list[Decision]:
        """Unconditional stops (divergence, overfitting) always happen. Of the others, the current
        best never stops, and the best of those marked are spared until min_survivors keep running."""
        if not stops:
            return []
        loss = {a.id: curves[a.id][-1] if a.id in curves else math.inf for a in running}
        best = min(loss, key=loss.get)
        unconditional = {aid for aid, (_, stop) in stops.items() if stop.unconditional}
        if best not in unconditional:
            stops.pop(best, None)
        spare = self.config.min_survivors - (len(running) - len(stops))
        for aid in sorted(set(stops) - unconditional, key=loss.get)[: max(0, spare)]:
            del stops[aid]
        step = {a.id: a.micro_step for a in running}
        decisions = [Decision(aid, step[aid], rule, stop.why) for aid, (rule, stop) in stops.items()]
        self.log.extend(decisions)
        return decisions
