"""Early-termination rules on synthetic trajectories where the right decision is known."""
import math
import random

import pytest

from alto.monitor import Monitor, MonitorConfig, extrapolate_final
from alto.registry import Adapter, AdapterConfig, Status


def simulate(curves: dict[str, callable], config: MonitorConfig, steps: int = 40, noise: float = 0.0, seed: int = 0):
    """Feeds each adapter its loss curve step by step; returns {adapter: micro-step it stopped at}
    (None = survived) and the monitor."""
    rng = random.Random(seed)
    adapters = {k: Adapter(k, AdapterConfig(max_steps=100)) for k in curves}
    for a in adapters.values():
        a.status = Status.RUNNING
    monitor, stopped = Monitor(config), {k: None for k in curves}
    for t in range(1, steps + 1):
        running = [a for a in adapters.values() if a.status == Status.RUNNING]
        for a in running:
            a.losses.append(curves[a.id](t) + rng.gauss(0, noise))
            a.micro_step = t
        for d in monitor.decide(running):
            adapters[d.adapter].status = Status.STOPPED_EARLY
            stopped[d.adapter] = t
            assert d.reason and d.micro_step == t
    return stopped, monitor


# fast starter that plateaus, a steady one, a late bloomer, and two poor ones
CURVES = {
    "plateau": lambda t: 2.0 + math.exp(-t / 2),
    "steady": lambda t: 2.2,
    "late_bloomer": lambda t: 3.2 - 0.45 * math.log(t),
    "poor": lambda t: 2.5 + 0.5 * math.exp(-t / 3),
    "poorer": lambda t: 2.8,
}


def test_late_bloomer_survives_asha_with_extrapolation():
    stopped, monitor = simulate(CURVES, MonitorConfig(rule="asha", grace=8, eta=2))
    assert stopped["late_bloomer"] is None, monitor.log
    assert stopped["poorer"] == 8 and stopped["poor"] == 8
    assert all("rung 0" in d.reason for d in monitor.log if d.micro_step == 8)


def test_plain_halving_loses_the_late_bloomer():
    # The baseline the default rule improves on: by its loss at the rung, the late bloomer looks poor.
    stopped, _ = simulate(CURVES, MonitorConfig(rule="halving", grace=8, eta=2))
    assert stopped["late_bloomer"] == 8


def test_noisy_curves_keep_the_late_bloomer_with_smoothing():
    stopped, _ = simulate(CURVES, MonitorConfig(rule="asha", grace=8, eta=2), noise=0.05, seed=3)
    assert stopped["late_bloomer"] is None and stopped["poorer"] is not None


def test_diverging_run_stops_at_once_even_in_the_grace_period():
    curves = dict(CURVES, diverging=lambda t: 2.0 * 1.5 ** (t - 1))
    stopped, monitor = simulate(curves, MonitorConfig(rule="asha", grace=8))
    assert stopped["diverging"] is not None and stopped["diverging"] < 8
    assert any(d.adapter == "diverging" and d.reason.startswith("diverging") for d in monitor.log)


def test_ties_keep_the_minimum_number_of_survivors():
    curves = {f"a{i}": (lambda t: 2.0 + 1.0 / t) for i in range(4)}
    stopped, _ = simulate(curves, MonitorConfig(rule="asha", grace=4, eta=2, min_survivors=3), steps=6)
    assert sum(s is not None for s in stopped.values()) == 1


def test_the_current_best_is_never_stopped():
    # One adapter alone at a rung can never be cut, and with two the better one stays.
    stopped, _ = simulate({"good": lambda t: 1.0, "bad": lambda t: 3.0}, MonitorConfig(rule="asha", grace=4, eta=4))
    assert stopped["good"] is None


def test_median_rule_stops_the_clearly_worse():
    curves = {"a": lambda t: 2.0, "b": lambda t: 2.1, "c": lambda t: 2.05, "bad": lambda t: 3.0}
    stopped, monitor = simulate(curves, MonitorConfig(rule="median", grace=6, check_every=3), steps=12)
    assert stopped["bad"] == 6 and stopped["a"] is None
    assert all("median rule" in d.reason for d in monitor.log)


def test_none_rule_only_stops_divergence():
    stopped, _ = simulate(dict(CURVES, diverging=lambda t: 2.0 * 2 ** t), MonitorConfig(rule="none"))
    assert [k for k, v in stopped.items() if v is not None] == ["diverging"]


def test_extrapolation_fits_log_curves():
    curve = [3.0 - 0.5 * math.log(t) for t in range(1, 21)]
    assert extrapolate_final(curve, 100) == pytest.approx(3.0 - 0.5 * math.log(100), rel=1e-6)


def test_bad_monitor_config_names_the_field():
    with pytest.raises(ValueError, match="monitor.rule='best'"):
        MonitorConfig(rule="best")
    with pytest.raises(ValueError, match="monitor.eta=1"):
        MonitorConfig(eta=1)


def test_one_noisy_micro_batch_is_not_divergence():
    spiky = {"spiky": lambda t: 5.0 if t in (2, 9) else 2.0, "other": lambda t: 2.1}
    stopped, _ = simulate(spiky, MonitorConfig(rule="none"), steps=12)
    assert stopped == {"spiky": None, "other": None}


def test_eval_signal_counts_evaluation_points():
    """With signal eval the rules read eval_losses; grace and rungs count evaluations."""
    adapters = {k: Adapter(k, AdapterConfig(max_steps=100), status=Status.RUNNING) for k in ("good", "bad")}
    monitor = Monitor(MonitorConfig(rule="asha", grace=3, eta=2, signal="eval", eval_every=5))
    for t in range(1, 31):
        for a in adapters.values():
            a.losses.append(9.0 if a.id == "good" else 1.0)  # the training loss points the other way
            a.micro_step = t
        if t % 5 == 0:
            adapters["good"].eval_losses.append(2.0)
            adapters["bad"].eval_losses.append(3.0)
            running = [a for a in adapters.values() if a.status == Status.RUNNING]
            for d in monitor.decide(running):
                adapters[d.adapter].status = Status.STOPPED_EARLY
                assert d.adapter == "bad" and t == 15 and "held-out" in d.reason and "eval 3" in d.reason
    assert adapters["bad"].status == Status.STOPPED_EARLY and adapters["good"].status == Status.RUNNING
