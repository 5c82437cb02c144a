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


def simulate_eval(train: dict[str, callable], held_out: dict[str, callable], config: MonitorConfig, steps: int = 60,
                  every: int = 5, max_steps: int = 100, start: dict[str, int] | None = None):
    """Training losses every micro-step, held-out losses every `every` (deciding then, as SweepRun
    does with signal eval); adapters may start late (start: the micro-step they arrive after).
    Returns {adapter: (micro-step it stopped at, the decision)} for the stopped ones."""
    adapters = {k: Adapter(k, AdapterConfig(max_steps=max_steps), status=Status.RUNNING) for k in train}
    monitor, stopped, start = Monitor(config), {}, start or {}
    for t in range(1, steps + 1):
        running = [a for a in adapters.values() if a.status == Status.RUNNING and t > start.get(a.id, 0)]
        for a in running:
            a.micro_step += 1
            a.losses.append(train[a.id](a.micro_step))
        if t % every == 0:
            for a in running:
                a.record_eval(held_out[a.id](a.micro_step))
            for d in monitor.decide(running):
                adapters[d.adapter].status = Status.STOPPED_EARLY
                stopped[d.adapter] = (t, d)
    return stopped


FLAT = lambda t: 2.0  # noqa: E731


def test_alto_divergence_needs_both_losses_rising_for_patience_evaluations():
    rising = lambda t: 2.0 + 0.01 * max(0, t - 20)  # noqa: E731  (from micro-step 20 on)
    config = MonitorConfig(rule="alto", warmup=0.0, keep=1.0, smoothing=1.0)
    stopped = simulate_eval({"both": rising, "held_out_only": FLAT, "train_only": rising, "good": FLAT},
                            {"both": lambda t: 2.1 + 0.01 * max(0, t - 20), "held_out_only": lambda t: 2.0 + 0.002 * t,
                             "train_only": lambda t: 2.1, "good": lambda t: 2.1}, config)
    # Evaluations at 5, 10, ...: the slopes over (20, 25) and (25, 30) rise, so the 2nd in a row is at 30.
    assert set(stopped) == {"both"}
    t, d = stopped["both"]
    assert t == 30 and d.rule == "alto" and "alto divergence (eval 6)" in d.reason
    # A slope below tau_slope is no divergence.
    calm = MonitorConfig(rule="alto", warmup=0.0, keep=1.0, smoothing=1.0, tau_slope=0.2)
    assert simulate_eval({"both": rising, "good": FLAT}, {"both": rising, "good": FLAT}, calm) == {}


def test_alto_overfitting_stops_even_the_best_after_patience_evaluations():
    """(held-out - training) / training >= 0.1 at two evaluations in a row stops the adapter, even
    the best one (its best held-out weights are what it exports); a gap of 0.09 does not."""
    config = MonitorConfig(rule="alto", warmup=0.0, keep=1.0, smoothing=1.0)
    train = {"overfits": lambda t: 1.0 if t < 30 else 0.5, "fits": lambda t: 1.0}
    held_out = {"overfits": lambda t: 1.05 if t < 30 else 0.6, "fits": lambda t: 1.09}
    stopped = simulate_eval(train, held_out, config)
    assert set(stopped) == {"overfits"}  # it has the lowest held-out loss: the guard spares no overfitting
    t, d = stopped["overfits"]
    assert t == 35 and "alto overfitting (eval 7)" in d.reason and "0.200 >= 0.1" in d.reason
    assert simulate_eval(train, held_out, MonitorConfig(rule="alto", warmup=0.0, keep=1.0, smoothing=1.0,
                                                        patience=3))["overfits"][0] == 40


def test_alto_warmup_keeps_the_best_quarter_and_late_arrivals_meet_the_same_cut():
    """At the first evaluation after 5% of 200 micro-steps (micro-step 10), 8 adapters -> the best 2
    go on; one arriving later is cut against what the first ones recorded there."""
    train = {f"a{i}": (lambda i: lambda t: 2.0 + 0.1 * i)(i) for i in range(9)}
    held_out = {f"a{i}": (lambda i: lambda t: 2.05 + 0.1 * i)(i) for i in range(9)}
    held_out["a8"] = lambda t: 2.0  # the late arrival is the best: it goes on
    stopped = simulate_eval(train, held_out, MonitorConfig(rule="alto"), every=5, max_steps=200,
                            start={"a8": 20})
    assert set(stopped) == {f"a{i}" for i in range(2, 8)}
    assert all(t == 10 and "alto warm-up (eval 2, micro-step 10)" in d.reason and "best 2 of 8" in d.reason
               for t, d in stopped.values())
    late = dict(held_out, a8=lambda t: 3.0)  # now it is the worst: cut at its own warm-up, among 9
    stopped = simulate_eval(train, late, MonitorConfig(rule="alto"), every=5, max_steps=200, start={"a8": 20})
    assert stopped["a8"][0] == 30 and "best 3 of 9" in stopped["a8"][1].reason


def test_rules_combine_and_each_decision_names_its_rule():
    """alto+asha: asha's rung cuts and alto's detectors both act on the same evaluations."""
    train = {f"a{i}": (lambda i: lambda t: 2.0 + 0.1 * i)(i) for i in range(4)}
    held_out = {**train, "a0": lambda t: 2.0 if t < 30 else 2.5}  # the gap 0.25 from micro-step 30 on
    config = MonitorConfig(rule=["alto", "asha"], grace=2, eta=2, keep=1.0, smoothing=1.0, extrapolate=False)
    assert config.rule == "alto+asha" and config.signal == "eval"
    stopped = simulate_eval(train, held_out, config, max_steps=100)
    rules = {aid: d.rule for _, d in stopped.values() for aid in [d.adapter]}
    # asha's rungs at evaluations 2 and 4 leave a0 alone; overfitting stops even the last one running
    assert rules == {"a1": "asha", "a2": "asha", "a3": "asha", "a0": "alto"}, stopped
    assert (stopped["a2"][0], stopped["a1"][0], stopped["a0"][0]) == (10, 20, 35)


@pytest.mark.parametrize("settings, field", [
    ({"rule": "alto", "signal": "train"}, "monitor.signal='train'"), ({"rule": "asha+asha"}, "monitor.rule='asha+asha'"),
    ({"rule": "alto+x"}, "monitor.rule='alto+x'"), ({"window": 1}, "monitor.window=1"), ({"keep": 0}, "monitor.keep=0"),
    ({"warmup": 1}, "monitor.warmup=1"), ({"tau_gap": math.inf}, "monitor.tau_gap=inf"),
    ({"patience": 0}, "monitor.patience=0")])
def test_alto_settings_are_checked(settings, field):
    with pytest.raises(ValueError, match=field.replace("+", r"\+")):
        MonitorConfig(**settings)
