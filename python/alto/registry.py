"""Adapter registry: every LoRA configuration of a sweep, its trained state and its status.

Adapters are added and removed between steps; the model layers hold each adapter's weights by id,
so adding or removing one never touches the others.
"""
from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from alto.inputs import is_int, is_number

LOSS_TYPES = ("sigmoid", "ipo")  # dpo's (alto.objectives.DPO)


class Status(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    STOPPED_EARLY = "stopped-early"
    FINISHED = "finished"
    FAILED = "failed"


def valid_adapter_id(adapter_id: str) -> bool:
    """Ids (and task names) name output folders: letters, digits, '-' and '_' only."""
    return bool(adapter_id) and all(c.isalnum() or c in "-_" for c in adapter_id)


def valid_adapter_name(name: str) -> bool:
    """An adapter's run-wide name: its id, or <task>/<id> in a multi-task sweep."""
    return isinstance(name, str) and 1 <= len(name.split("/")) <= 2 and all(map(valid_adapter_id, name.split("/")))


class ConfigFieldError(ValueError):
    """A bad adapter field: `field` names it and `problem` says what is wrong with its value, so that
    a sweep file's error can name where the field was written (defaults.alpha, grid[rank0].rank)."""

    def __init__(self, field_name: str, value: Any, rule: str) -> None:
        self.field, self.problem = field_name, f"{value!r} is invalid: {rule}"
        super().__init__(f"adapter config: {field_name}={self.problem}")


def _require(ok: bool, field_name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigFieldError(field_name, value, rule)


@dataclass(frozen=True)
class AdapterConfig:
    """Hyperparameters of one LoRA adapter (validated on construction)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | linear | cosine (after warmup_steps)
    warmup_steps: int = 0
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    seed: int = 0
    max_steps: int = 100  # optimizer steps
    beta: float = 0.1  # dpo: the strength of the pull to the reference (TRL's beta)
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo (TRL's loss types)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        _require(isinstance(self.target_modules, (list, tuple)), "target_modules", self.target_modules,
                 "a list of module names")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("alpha", "dropout", "lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            _require(value is None and name == "max_grad_norm" or is_number(value), name, value, "a number")
        _require(is_int(self.rank) and 1 <= self.rank <= 4096, "rank", self.rank, "an int in 1..4096")
        _require(self.alpha > 0 and math.isfinite(self.alpha), "alpha", self.alpha, "a positive number")
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive number")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "non-negative")
        _require(self.schedule in ("constant", "linear", "cosine"), "schedule", self.schedule,
                 "one of constant, linear, cosine")
        _require(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps",
                 self.warmup_steps, "a non-negative int")
        _require(is_int(self.micro_batch_size) and self.micro_batch_size >= 1,
                 "micro_batch_size", self.micro_batch_size, "an int >= 1")
        _require(is_int(self.grad_accum) and self.grad_accum >= 1, "grad_accum",
                 self.grad_accum, "an int >= 1")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
                 self.max_grad_norm, "positive or None")
        _require(len(self.target_modules) > 0, "target_modules", self.target_modules, "not empty")
        for m in self.target_modules:  # which the model has: alto.families.check_targets, once it is loaded
            _require(isinstance(m, str) and m.isidentifier(), "target_modules", m, "a module name (e.g. q_proj)")
        _require(is_int(self.max_steps) and self.max_steps >= 1, "max_steps", self.max_steps,
                 "an int >= 1")
        _require(isinstance(self.use_rslora, bool), "use_rslora", self.use_rslora, "true or false")
        _require(is_int(self.seed) and 0 <= self.seed < 2**63, "seed", self.seed, "a non-negative int")
        _require(is_number(self.beta) and 0 < self.beta and math.isfinite(self.beta), "beta", self.beta,
                 "a positive number")
        _require(self.loss_type in LOSS_TYPES, "loss_type", self.loss_type, f"one of {', '.join(LOSS_TYPES)}")

    @property
    def scaling(self) -> float:
        """LoRA's output scale: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.max_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class Adapter:
    """One configuration of a sweep and what training it produced so far."""

    id: str
    config: AdapterConfig
    task: str = "default"
    status: Status = Status.QUEUED
    step: int = 0  # optimizer steps taken
    micro_step: int = 0  # micro-batches consumed
    losses: list[float] = field(default_factory=list)  # mean loss of every micro-batch
    eval_losses: list[float] = field(default_factory=list)  # held-out loss at each evaluation
    eval_steps: list[int] = field(default_factory=list)  # its micro_step at each evaluation
    best: tuple[int, float] | None = None  # (optimizer step, held-out loss) of its best evaluation
    last_loss: float | None = None  # held-out loss of its last weights, evaluated as it finished
    failure: str | None = None
    extra_batch: int = 0  # samples added to config.micro_batch_size by capacity reclaim ("grow")

    def record_eval(self, loss: float) -> None:
        self.eval_losses.append(loss)
        self.eval_steps.append(self.micro_step)

    @property
    def micro_batch_size(self) -> int:
        return self.config.micro_batch_size + self.extra_batch

    def marks(self) -> tuple[int, int]:
        """How many training and held-out losses it has: a `since` for progress()."""
        return len(self.losses), len(self.eval_losses)

    def progress(self, since: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """Its progress as plain data, the one serialization of it (checkpoints, the per-step rank
        reports, alto_adapter.json): status, counts, why it ended, grown samples, and the training
        and held-out losses from `since` (marks() taken earlier; default: all) on."""
        return {"status": self.status.value, "step": self.step, "micro_step": self.micro_step,
                "failure": self.failure, "extra_batch": self.extra_batch, "best": self.best,
                "last_loss": self.last_loss,
                "losses": self.losses[since[0]:], "eval_losses": self.eval_losses[since[1]:],
                "eval_steps": self.eval_steps[since[1]:]}

    def apply_progress(self, progress: dict[str, Any], since: tuple[int, int] = (0, 0)) -> None:
        """Takes what progress(since) returned (its losses replace those from `since` on)."""
        self.status = Status(progress["status"])
        self.step, self.micro_step = progress["step"], progress["micro_step"]
        self.failure, self.extra_batch = progress["failure"], progress["extra_batch"]
        self.best = None if progress["best"] is None else tuple(progress["best"])
        self.last_loss = progress.get("last_loss")  # absent from an earlier release's checkpoints
        self.losses[since[0]:] = progress["losses"]
        self.eval_losses[since[1]:] = progress["eval_losses"]
        self.eval_steps[since[1]:] = progress["eval_steps"]


class Registry:
    """The adapters of a run, in admission order."""

    def __init__(self) -> None:
        self._adapters: dict[str, Adapter] = {}

    def add(self, adapter_id: str, config: AdapterConfig, task: str = "default") -> Adapter:
        if not valid_adapter_name(adapter_id):
            raise ValueError(f"adapter id {adapter_id!r} must be letters, digits, '-' or '_' (or <task>/<id>)")
        if adapter_id in self._adapters:
            raise ValueError(f"adapter id {adapter_id!r} is already registered")
        adapter = Adapter(adapter_id, config, task)
        self._adapters[adapter_id] = adapter
        return adapter

    def __getitem__(self, adapter_id: str) -> Adapter:
        try:
            return self._adapters[adapter_id]
        except KeyError:
            raise KeyError(f"no adapter {adapter_id!r}; registered: {list(self._adapters)}") from None

    def __iter__(self):
        return iter(self._adapters.values())

    def __len__(self) -> int:
        return len(self._adapters)

    def with_status(self, *statuses: Status) -> list[Adapter]:
        return [a for a in self._adapters.values() if a.status in statuses]
