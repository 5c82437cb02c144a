"""alto.decisions.decide alone: a registry, a placement and an admission state in, Decisions out;
no model, no device. Expected values worked out by hand from the rules in its docstring."""
from alto.admission import Admission
from alto.decisions import Decisions, decide
from alto.monitor import Decision
from alto.registry import AdapterConfig, Registry, Status
from alto.sched.catalog import ModelShape
from alto.sched.memory import PeakModel

SHAPE = ModelShape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=100)


def registry(batches: dict[str, int], running: set[str]) -> Registry:
    reg = Registry()
    for aid, batch in batches.items():
        reg.add(aid, AdapterConfig(rank=4, micro_batch_size=batch)).status = Status.RUNNING if aid in running else Status.QUEUED
    return reg


def per_sample(adapters) -> dict[str, float]:  # a step's cost: one unit per sample
    return {a.id: float(a.micro_batch_size) for a in adapters}


def stop(aid: str) -> Decision:
    return Decision(adapter=aid, micro_step=3, rule="asha", reason="worse than its rung")


def test_stopped_adapters_free_slots_that_queued_ones_take_largest_micro_batch_first():
    reg = registry({"r1": 2, "r2": 2, "r3": 2, "q1": 1, "q2": 4, "q3": 2}, running={"r1", "r2", "r3"})
    owner = {"r1": 0, "r2": 0, "r3": 0}
    got = decide(reg, [stop("r2")], owner, {}, world=1, admission=None, slots=3, reclaim="queued",
                 samples_budget=6, costs=per_sample)
    assert got == Decisions([stop("r2")], {"q2": 0})  # one slot freed: the largest micro-batch
    got = decide(reg, [stop("r1"), stop("r2")], owner, {}, world=1, admission=None, slots=3, reclaim="queued",
                 samples_budget=6, costs=per_sample)
    assert got.admissions == {"q2": 0, "q3": 0} and got.growth == {}


def test_the_memory_model_admits_what_fits_and_grow_refills_only_when_nobody_waits():
    # capacity: 10 sample-positions of 1 byte (10 positions per sample, no parameter bytes)
    adm = Admission(PeakModel(0.0, 1.0, 0.0), capacity=100.0, shape=SHAPE, lengths={"default": (10.0, 0.0)})
    reg = registry({"r1": 4, "q1": 8, "q2": 3, "q3": 2}, running={"r1"})
    got = decide(reg, [], {"r1": 0}, {}, world=1, admission=adm, slots=0, reclaim="grow", samples_budget=9,
                 costs=per_sample)
    assert got.admissions == {"q2": 0, "q3": 0}  # q1 (8) does not fit beside r1 (4); 4 + 3 + 2 = 9 does
    assert got.growth == {}  # q1 still waits: no growth
    reg = registry({"r1": 4, "r2": 3}, running={"r1", "r2"})
    got = decide(reg, [], {"r1": 0, "r2": 0}, {}, world=1, admission=adm, slots=0, reclaim="grow",
                 samples_budget=10, costs=per_sample)
    assert got.growth == {"r1": 2, "r2": 1}  # 3 samples back, round robin: 4 + 3 + 3 = 10 fits
    got = decide(reg, [], {"r1": 0, "r2": 0}, {}, world=1, admission=adm, slots=0, reclaim="grow",
                 samples_budget=11, costs=per_sample)
    assert got.growth == {}  # 11 samples would not fit: none grown


def test_two_ranks_place_admissions_on_the_idler_rank_pin_held_states_and_even_out_the_work():
    reg = registry({"a": 4, "b": 4, "c": 1, "q1": 2, "q2": 2}, running={"a", "b", "c"})
    owner = {"a": 0, "b": 0, "c": 1}
    got = decide(reg, [], owner, {}, world=2, admission=None, slots=3, reclaim="queued", samples_budget=0,
                 costs=per_sample)
    # loads 8 | 1: both queued go to rank 1 (1 -> 3 -> 5); moving a or b would leave 4 | 9, a higher peak: none
    assert got.admissions == {"q1": 1, "q2": 1} and got.moves == []
    got = decide(reg, [], owner, {"q1": 0}, world=2, admission=None, slots=3, reclaim="queued", samples_budget=0,
                 costs=per_sample)
    assert got.admissions == {"q2": 1, "q1": 0}  # q1's state is on rank 0: it starts there
    # 10 | 3: a (the first of the two that even it best) moves to rank 1: 6 | 7, which no move lowers by 5%
    assert got.moves == [("a", 0, 1)]
