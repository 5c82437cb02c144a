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

The trajectory is the training loss of every micro-step, or (``signal: eval``) a held-out loss
measured every ``eval_every`` micro-steps; grace, rungs and checks then count those points.

Hard guards for every rule: nothing stops before ``grace`` points (except divergence); a
diverging adapter (smoothed loss above ``divergence_factor`` times the mean of its first
``DIVERGENCE_BASELINE`` losses: one noisy micro-batch is not a trend) stops at once;
the current best adapter is never stopped; at least ``min_survivors`` keep running. Every decision
carries its reason.
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
    rule: str = "asha"
    grace: int = 8  # micro-steps before any rule may stop an adapter
    eta: float = 2.0  # keep the best 1/eta at each rung
    check_every: int = 4  # median rule: how often (micro-steps) after the grace period
    min_survivors: int = 1
    smoothing: float = 0.3  # weight of the newest loss in the exponential moving average
    divergence_factor: float = 2.0
    extrapolate: bool = True
    signal: str = "train"  # the trajectory read: "train" losses, or "eval" (held-out) losses
    eval_every: int = 5  # micro-steps between held-out evaluations (signal "eval")

    def __post_init__(self) -> None:
        checks = [  # each type check comes first: `and` stops before a comparison it would break
            (isinstance(self.rule, str) and self.rule in RULES, "rule", f"one of {', '.join(RULES)}"),
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
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"monitor.{name}={getattr(self, name)!r} is invalid: {rule}")


@dataclass(frozen=True)
class Decision:
    adapter: str
    micro_step: int
    rule: str
    reason: str


def smoothed(losses: list[float], alpha: float) -> list[float]:
    out: list[float] = []
    for v in losses:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


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
    rules compare simultaneous arrivals), then ``reason`` says why one stops now (None: it goes on)."""

    def record(self, monitor: "Monitor", a: Adapter, curve: list[float], t: int) -> None:
        pass

    def reason(self, monitor: "Monitor", a: Adapter, curves: dict[str, list[float]], running: list[Adapter],
               t: int) -> str | None:
        return None


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
            monitor.rungs.setdefault(k, {})[a.id] = self.score(monitor, a, curve)

    def reason(self, monitor: "Monitor", a: Adapter, curves: dict[str, list[float]], running: list[Adapter],
               t: int) -> str | None:
        c = monitor.config
        k = monitor.rung_of(t)
        if k is None:
            return None
        rung = monitor.rungs[k]
        ranked = sorted(rung, key=lambda aid: (rung[aid], aid))  # ties: by id, deterministic
        keep = max(1, int(len(ranked) / c.eta))
        if ranked.index(a.id) < keep:
            return None
        what = f"held-out {self.what(c)}" if c.signal == "eval" else self.what(c)
        return (f"{c.rule} rung {k} ({monitor.unit} {t}): {what} {rung[a.id]:.4f} is not in the "
                f"best {keep} of {len(ranked)} (cut {rung[ranked[keep - 1]]:.4f})")


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
               t: int) -> str | None:
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
            return (f"median rule ({monitor.unit} {t}): best smoothed loss {best:.4f} > median running "
                    f"average {med:.4f}")
        return None


RULES: dict[str, type[Rule]] = {"asha": Asha, "median": Median, "halving": Halving, "none": Never}


@dataclass
class Monitor:
    config: MonitorConfig = field(default_factory=MonitorConfig)
    rungs: dict[int, dict[str, float]] = field(default_factory=dict)  # rung -> adapter -> score
    log: list[Decision] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rule = RULES[self.config.rule]()

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
        stops: dict[str, str] = {}
        for a in running:
            curve = curves.get(a.id)
            if curve and len(curve) > DIVERGENCE_BASELINE:
                start = statistics.fmean(self.points(a)[:DIVERGENCE_BASELINE])
                if curve[-1] > c.divergence_factor * start:
                    stops[a.id] = (f"diverging: smoothed loss {curve[-1]:.4f} > {c.divergence_factor} x "
                                   f"starting loss {start:.4f}")
        judged = [a for a in running if a.id in curves and progress[a.id] >= c.grace]
        for a in judged:  # every arrival first: simultaneous ones compete
            self.rule.record(self, a, curves[a.id], progress[a.id])
        for a in judged:
            if a.id not in stops:
                reason = self.rule.reason(self, a, curves, running, progress[a.id])
                if reason:
                    stops[a.id] = reason
        return self._guard(stops, running, curves)

    def _guard(self, stops: dict[str, str], running: list[Adapter], curves: dict[str, list[float]]) -> list[Decision]:
        """Diverging adapters always stop. Of the others, the current best never stops, and the
        best of those marked are spared until min_survivors keep running."""
        if not stops:
            return []
        loss = {a.id: curves[a.id][-1] if a.id in curves else math.inf for a in running}
        best = min(loss, key=loss.get)
        diverging = {aid for aid, why in stops.items() if why.startswith("diverging")}
        if best not in diverging:
            stops.pop(best, None)
        spare = self.config.min_survivors - (len(running) - len(stops))
        for aid in sorted(set(stops) - diverging, key=loss.get)[: max(0, spare)]:
            del stops[aid]
        step = {a.id: a.micro_step for a in running}
        decisions = [Decision(aid, step[aid], self.config.rule, why) for aid, why in stops.items()]
        self.log.extend(decisions)
        return decisions
