"""Duration model: FLOPs of a co-located LoRA step, a step-time model calibrated on measured steps,
and an online correction per job.

Step time of one co-located step with adapters ``c_1..c_N`` on a GPU of type ``g``:

    t = sum_i adapter_step_flops(c_i) * seconds_per_flop * (peak(H100) / peak(g))
        + step_overhead_s + N * adapter_overhead_s

``seconds_per_flop`` is the frozen backbone's effective throughput (calibrated, not the datasheet
peak); ``step_overhead_s`` is what every step pays (launches, loss, host bookkeeping);
``adapter_overhead_s`` is what each adapter adds beyond its FLOPs (its LoRA passes are
memory-bound, its optimizer step and clipping run per adapter). The three coefficients are fitted
by least squares to the H100 step times in ``data/bench_step_h100.csv`` (from bench/RESULTS.md);
other GPU types scale the FLOP term by their peak bf16 rate and keep the overheads (host-bound).
:func:`error_report` gives the leave-one-configuration-out error of that fit.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Iterable, Sequence

import numpy as np

from alto.families import Llama
from alto.registry import AdapterConfig
from alto.sched.catalog import GPU_TYPES, REFERENCE_GPU, GPUType, ModelShape, gpu_type

def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be an int >= 1")


def base_flops_per_token(seq_len: int, shape: ModelShape) -> float:
    """Frozen backbone, forward + input-gradient backward: 2 + 2 flops per weight, plus causal
    attention (QKᵀ and AV forward = 2·seq·hidden per token per layer with the causal half, backward twice that)."""
    _check_seq_len(seq_len)
    return 4.0 * shape.matmul_params() + 6.0 * seq_len * shape.hidden * shape.layers


def lora_flops_per_token(config: AdapterConfig, shape: ModelShape) -> float:
    """Shrink + expand forward (2 matmuls) and backward (4): 6·rank·(in+out) per targeted layer."""
    dims = shape.projection_dims()
    return 6.0 * config.rank * shape.layers * sum(sum(dims[m]) for m in config.target_modules)


def adapter_step_flops(config: AdapterConfig, seq_len: int, shape: ModelShape) -> float:
    """FLOPs one micro-step of this adapter adds to a co-located step: its micro_batch_size*seq_len tokens
    through the frozen base (forward + input-gradient backward, ~4 flops/param/token, plus attention) and its LoRA
    shrink/expand forward+backward on its target modules (~6*rank*(in+out) per token per targeted layer)."""
    tokens = config.micro_batch_size * seq_len
    return tokens * (base_flops_per_token(seq_len, shape) + lora_flops_per_token(config, shape))


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds of one co-located step (see the module docstring for the formula)."""

    seconds_per_flop: float  # on the reference GPU
    step_overhead_s: float
    adapter_overhead_s: float
    frozen_overhead_s: float  # the part of step_overhead_s a bare frozen fwd+bwd pays (calibration only)

    def compute_seconds(self, flops: float, gpu: str | GPUType = REFERENCE_GPU) -> float:
        scale = GPU_TYPES[REFERENCE_GPU].peak_bf16_flops / gpu_type(gpu).peak_bf16_flops
        return flops * self.seconds_per_flop * scale

    def step_seconds(self, configs: Sequence[AdapterConfig], seq_len: int | Sequence[int], shape: ModelShape,
                     gpu: str | GPUType = REFERENCE_GPU) -> float:
        """seq_len: one for every config, or each config's own (tasks of one sweep differ)."""
        if not configs:
            raise ValueError("step_seconds: configs is empty (a step trains at least one adapter)")
        lens = [seq_len] * len(configs) if isinstance(seq_len, int) else list(seq_len)
        flops = sum(adapter_step_flops(c, n, shape) for c, n in zip(configs, lens, strict=True))
        return self.compute_seconds(flops, gpu) + self.step_overhead_s + len(configs) * self.adapter_overhead_s

    def frozen_step_seconds(self, configs: Sequence[AdapterConfig], seq_len: int, shape: ModelShape,
                            gpu: str | GPUType = REFERENCE_GPU) -> float:
        """The frozen backbone's fwd+bwd over the same batch, no adapters (the bench's `base` column)."""
        tokens = sum(c.micro_batch_size for c in configs) * seq_len
        return self.compute_seconds(tokens * base_flops_per_token(seq_len, shape), gpu) + self.frozen_overhead_s


# The calibration bench (bench/bench_step.py): Llama-3-8B widths with 4 layers, 512-token sequences.
BENCH_SHAPE = ModelShape(hidden=4096, layers=4, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
BENCH_SEQ_LEN = 512
BENCH_RANKS = (8, 16, 32, 64)


def bench_configs(adapters: int) -> list[AdapterConfig]:
    return [AdapterConfig(rank=BENCH_RANKS[i % len(BENCH_RANKS)], micro_batch_size=1,
                          target_modules=Llama.names) for i in range(adapters)]


@dataclass(frozen=True)
class Measurement:
    kind: str  # base | alto | loop
    adapters: int
    ms: float
    source: str

    @property
    def group(self) -> tuple[str, int]:
        return self.kind, self.adapters


def load_calibration() -> list[Measurement]:
    """The H100 step times recorded in bench/RESULTS.md (shipped as package data)."""
    text = resources.files("alto.sched").joinpath("data/bench_step_h100.csv").read_text()
    rows = csv.DictReader(io.StringIO("".join(l for l in text.splitlines(True) if not l.startswith("#"))))
    return [Measurement(r["kind"], int(r["adapters"]), float(r["ms"]), r["source"]) for r in rows]


def _features(m: Measurement) -> list[float]:
    # Coefficients: seconds_per_flop, frozen overhead, trainer overhead, per-adapter overhead.
    configs = bench_configs(m.adapters)
    if m.kind == "base":
        return [m.adapters * BENCH_SEQ_LEN * base_flops_per_token(BENCH_SEQ_LEN, BENCH_SHAPE), 1.0, 0.0, 0.0]
    if m.kind == "alto":
        return [sum(adapter_step_flops(c, BENCH_SEQ_LEN, BENCH_SHAPE) for c in configs), 1.0, 1.0, float(m.adapters)]
    raise ValueError(f"calibration: kind={m.kind!r} cannot be fitted (base or alto)")


def _non_negative_lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (an overhead or a time per FLOP is never negative):
    refit without the most negative coefficient until none is (enough for 4 coefficients)."""
    active = list(range(X.shape[1]))
    while True:
        coef = np.zeros(X.shape[1])
        coef[active] = np.linalg.lstsq(X[:, active], y, rcond=None)[0]
        if coef.min() >= 0:
            return coef
        active.remove(int(np.argmin(coef)))


def fit(measurements: Iterable[Measurement]) -> StepTimeModel:
    """Least-squares fit of the step-time coefficients to `base` and `alto` measurements."""
    rows = [m for m in measurements if m.kind in ("base", "alto")]
    if len({m.group for m in rows if m.kind == "base"}) < 2 or len({m.group for m in rows if m.kind == "alto"}) < 2:
        raise ValueError("calibration: need base and alto step times at >= 2 adapter counts each")
    # One equation per configuration (the mean of its repeated runs), so that a configuration
    # measured five times does not outweigh the others.
    groups = {m.group: m for m in rows}
    X = np.array([_features(m) for m in groups.values()])
    X[:, 0] *= 1e-12  # conditioning: FLOPs in TFLOP
    y = np.array([np.mean([m.ms for m in rows if m.group == g]) / 1e3 for g in groups])
    coef = _non_negative_lstsq(X, y)
    spf, frozen, trainer, per_adapter = coef[0] * 1e-12, coef[1], coef[2], coef[3]
    if spf <= 0:
        raise ValueError(f"calibration: fitted seconds_per_flop={spf:.3g} is not positive")
    return StepTimeModel(seconds_per_flop=float(spf), step_overhead_s=float(frozen + trainer),
                         adapter_overhead_s=float(per_adapter), frozen_overhead_s=float(frozen))


def predict_measurement(model: StepTimeModel, m: Measurement) -> float:
    """Predicted milliseconds of a calibration row (loop = each adapter stepped alone, in turn)."""
    configs = bench_configs(m.adapters)
    if m.kind == "base":
        s = model.frozen_step_seconds(configs, BENCH_SEQ_LEN, BENCH_SHAPE)
    elif m.kind == "alto":
        s = model.step_seconds(configs, BENCH_SEQ_LEN, BENCH_SHAPE)
    else:
        s = sum(model.step_seconds([c], BENCH_SEQ_LEN, BENCH_SHAPE) for c in configs)
    return s * 1e3


@dataclass(frozen=True)
class ErrorRow:
    kind: str
    adapters: int
    measured_ms: float  # mean of the group's measurements
    runs: int
    fitted_ms: float  # the fit on every base/alto measurement
    held_out_ms: float  # the fit without this group (loop rows are never fitted)

    @property
    def held_out_error(self) -> float:
        return (self.held_out_ms - self.measured_ms) / self.measured_ms


def error_report(measurements: Sequence[Measurement] | None = None) -> list[ErrorRow]:
    """Leave-one-configuration-out error: each (kind, adapters) group is predicted by a fit on the others."""
    ms = list(measurements) if measurements is not None else load_calibration()
    full = fit(ms)
    out = []
    for group in dict.fromkeys(m.group for m in ms):
        members = [m for m in ms if m.group == group]
        held_out = fit([m for m in ms if m.group != group])
        out.append(ErrorRow(group[0], group[1], float(np.mean([m.ms for m in members])), len(members),
                            predict_measurement(full, members[0]), predict_measurement(held_out, members[0])))
    return out


def format_error_report(rows: Sequence[ErrorRow], model: StepTimeModel) -> str:
    lines = [f"step-time model (H100): effective {1 / model.seconds_per_flop / 1e12:.0f} TFLOP/s, "
             f"step overhead {model.step_overhead_s * 1e3:.1f} ms, per adapter {model.adapter_overhead_s * 1e3:.2f} ms",
             "kind | adapters | runs | measured ms | fitted ms | held-out ms | held-out error",
             "--- | --- | --- | --- | --- | --- | ---"]
    lines += [f"{r.kind} | {r.adapters} | {r.runs} | {r.measured_ms:.1f} | {r.fitted_ms:.1f} | "
              f"{r.held_out_ms:.1f} | {r.held_out_error:+.1%}" for r in rows]
    errs = [abs(r.held_out_error) for r in rows]
    lines.append(f"mean |held-out error| {np.mean(errs):.1%}, max {max(errs):.1%} over {len(rows)} configurations")
    return "\n".join(lines)


_DEFAULT: StepTimeModel | None = None


def default_model() -> StepTimeModel:
    """The model fitted on the shipped H100 calibration data (fitted once per process)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = fit(load_calibration())
    return _DEFAULT


class JobEstimate:
    """Predicted remaining time of one running job, corrected online by its measured step times.

    The correction is a per-job ratio measured/predicted, exponentially smoothed; it survives a
    change of the predicted step (configs stopping early) because it models the job's own bias
    (data, sequence lengths, a slower GPU) rather than one step.
    """

    def __init__(self, predicted_step_s: float, smoothing: float = 0.3) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing={smoothing!r} must be in (0, 1]")
        self.smoothing = smoothing
        self.ratio = 1.0
        self.predicted_step_s = 0.0
        self.set_prediction(predicted_step_s)

    def set_prediction(self, predicted_step_s: float) -> None:
        if not predicted_step_s > 0:
            raise ValueError(f"predicted_step_s={predicted_step_s!r} must be positive")
        self.predicted_step_s = predicted_step_s

    def observe(self, measured_step_seconds: float) -> None:
        if not measured_step_seconds > 0:
            raise ValueError(f"measured_step_seconds={measured_step_seconds!r} must be positive")
        r = measured_step_seconds / self.predicted_step_s
        self.ratio += self.smoothing * (r - self.ratio)

    @property
    def step_seconds(self) -> float:
        return self.predicted_step_s * self.ratio

    def remaining_seconds(self, steps_left: float) -> float:
        return max(0.0, steps_left) * self.step_seconds


@dataclass(frozen=True)
class Work:
    """An adapter's work left in a run: its micro-batches still to train, at its sequence length."""

    config: AdapterConfig
    seq_len: int
    micro_steps: int


def forecast(running: Sequence[Work], queued: Sequence[Work], slots: int,
             step_seconds: Callable[[Sequence[Work]], float]) -> tuple[int, float]:
    """(micro-steps, seconds) until every adapter is done if none stops early: the running ones step
    together; each that finishes frees its slot for the next queued one (slots: how many run at
    once); step_seconds(the adapters of a step) predicts a step. Stops the monitor will make are not
    foreseen: the forecast shrinks as they happen."""
    running, queued = [w for w in running if w.micro_steps > 0], [w for w in queued if w.micro_steps > 0]
    slots = max(1, slots)
    while queued and len(running) < slots:
        running.append(queued.pop(0))
    left = {id(w): w.micro_steps for w in running}
    steps, seconds = 0, 0.0
    while running:
        span = min(left[id(w)] for w in running)
        steps, seconds = steps + span, seconds + span * step_seconds(running)
        for w in running:
            left[id(w)] -= span
        running = [w for w in running if left[id(w)] > 0]
        while queued and len(running) < slots:
            w = queued.pop(0)
            left[id(w)] = w.micro_steps
            running.append(w)
    return steps, seconds


if __name__ == "__main__":  # the error report recorded in bench/RESULTS.md: python -m alto.sched.estimate
    print(format_error_report(error_report(), default_model()))
