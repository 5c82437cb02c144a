"""The searcher seam (alto.searchers): the grid proposes a task's configurations once; a searcher
that proposes while the run goes, from the results it is told, grows the registry, the data
streams and the checkpoint at run time; each adapter it proposed trains exactly as the same
configuration in a grid run (float64); a run killed at a checkpoint resumes its searcher and ends
bit for bit as the uninterrupted run."""
import csv
import json

import pytest
import torch

from alto import search as search_mod
from alto.decisions import decide
from alto.registry import Adapter, AdapterConfig, Registry, Status
from alto.search import Search
from alto.searchers import Grid, Searcher
from alto.sweep import parse_sweep
from alto.sweep_run import SweepRun
from alto.train import DataStream
from conftest import TINY_LLAMA, write_word_records


def quiet(*_):
    pass


def sweep_doc(tmp_path, out, **extra):
    data = write_word_records(tmp_path / "data.jsonl", max_words=6)
    return {"name": "t", "model": {"random_llama": TINY_LLAMA}, "base": {"dtype": "float64"}, "device": "cpu",
            "checkpoint_every": 2, "max_running": 2, "output": str(tmp_path / out),
            "data": {"source": "jsonl", "path": str(data), "max_length": 24, "eval_fraction": 0.2},
            "defaults": {"micro_batch_size": 2, "target_modules": ["q_proj", "v_proj"]},
            "eval": {"every": 2, "samples": 4}, **extra}


def test_the_grid_proposes_every_configuration_once_in_the_sweeps_order(tmp_path):
    doc = sweep_doc(tmp_path, "g", grid={"rank": [2, 4], "lr": [1e-3, 3e-3]}, adapters=[{"id": "wide", "rank": 8}])
    task = parse_sweep(json.dumps(doc)).tasks["t"]
    search, registry = Search([task], tmp_path), Registry()
    first = search.propose(registry, [])
    assert [(a.id, a.config) for a in first] == list(task.adapters.items())
    assert Grid.planned(task) == 5 and Grid.bounds(task) == task.adapters
    for a in first:
        registry.add(a.id, a.config, a.task).status = Status.FINISHED
    assert search.propose(registry, []) == []  # told of all five, proposes nothing more
    assert search.told == set(task.adapters)
    again = Search([task], tmp_path)
    again.load_state(search.state(), registry)
    assert again.propose(registry, []) == [] and again.told == set(task.adapters)  # resumed: nothing again
    assert Grid.foreign(task, ["wide", "rank2-lr0p001"]) is None
    assert Grid.foreign(task, ["wide", "stranger"]) == "stranger"


def test_proposals_are_queued_and_admitted_like_the_queue():
    reg = Registry()
    reg.add("r1", AdapterConfig(rank=4, micro_batch_size=2)).status = Status.RUNNING
    reg.add("q1", AdapterConfig(rank=4, micro_batch_size=1))
    proposed = [Adapter("p1", AdapterConfig(rank=4, micro_batch_size=4), "default")]
    got = decide(reg, [], {"r1": 0}, {}, world=1, admission=None, slots=2, reclaim="admit", samples_budget=0,
                 costs=lambda adapters: {a.id: 1.0 for a in adapters}, proposals=proposed)
    assert got.admissions == {"p1": 0}  # one free slot: the largest micro-batch, proposed or queued
    assert got.proposals == proposed
    got = decide(reg, [], {"r1": 0}, {}, world=2, admission=None, slots=2, reclaim="grow", samples_budget=9,
                 costs=lambda adapters: {a.id: 1.0 for a in adapters}, proposals=proposed)
    assert set(got.admissions) == {"p1", "q1"} and sum(got.growth.values()) == 9 - 7  # grown, proposals included


class Successive(Searcher):
    """A searcher whose proposals depend on what it is told: two configurations to start with, then
    one per freed slot (three in all), each next one at half the learning rate of the best so far."""

    name = "successive"

    def __init__(self, task, run_dir):
        self.told: list[tuple[str, str, float | None]] = []
        self.lrs: dict[str, float] = {}

    @classmethod
    def bounds(cls, task):
        return {"s": AdapterConfig(rank=4, micro_batch_size=2, target_modules=("q_proj", "v_proj"))}

    @classmethod
    def planned(cls, task):
        return 3

    def _config(self, lr, max_steps):
        aid = f"s{len(self.lrs) + 1}"
        self.lrs[aid] = lr
        return aid, AdapterConfig(rank=4, lr=lr, max_steps=max_steps, micro_batch_size=2, seed=len(self.lrs),
                                  target_modules=("q_proj", "v_proj"))

    def propose(self, free):
        if free is None:
            return [self._config(3e-3, 2), self._config(1e-3, 5)]
        if len(self.lrs) == 3:
            return []
        best = min((t for t in self.told if t[2] is not None), key=lambda t: t[2])
        return [self._config(self.lrs[best[0]] / 2, 3)][:free]

    def tell(self, adapter, status, result):
        self.told.append((adapter.id, status.value, result))

    def state(self):
        return {"told": list(self.told), "lrs": dict(self.lrs)}

    def load_state(self, state):
        self.told, self.lrs = [tuple(t) for t in state["told"]], dict(state["lrs"])

    @classmethod
    def foreign(cls, task, adapter_ids):
        return next((aid for aid in adapter_ids if not aid.startswith("s")), None)


def losses_rows(run_dir):
    with open(run_dir / "losses.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_with(monkeypatch, sweep, run_dir, until=None, resume=False):
    monkeypatch.setitem(search_mod.SEARCHERS, "grid", Successive)  # the task's searcher, for this run
    run_dir.mkdir(exist_ok=True)
    run = SweepRun(sweep, run_dir, resume=resume)
    done = run.run(until, log=quiet)
    return run, done


def test_a_searcher_proposes_while_the_run_goes_and_each_proposal_trains_as_in_a_grid(tmp_path, monkeypatch):
    sweep = parse_sweep(json.dumps(sweep_doc(tmp_path, "s", adapters=[{"id": "s1"}])))
    run, done = run_with(monkeypatch, sweep, tmp_path / "s")
    assert done
    searcher = run.search.searchers["t"]
    assert [a.id for a in run.registry] == ["s1", "s2", "s3"]
    assert all(a.status == Status.FINISHED for a in run.registry)
    # s1 ended first (2 steps): s3 was proposed then, at half the lr of the best told so far (s1's)
    assert [t[0] for t in searcher.told] == ["s1", "s2", "s3"]  # s2 and s3 end in the same step
    assert searcher.lrs["s3"] == searcher.lrs["s1"] / 2
    for aid, status, result in searcher.told:  # told once each, the result its best held-out loss
        assert status == "finished" and result == run.registry[aid].best[1]
    first_step = {}
    for r in losses_rows(tmp_path / "s"):
        first_step.setdefault(r["adapter"], int(r["micro_step"]))
    assert first_step["s1"] == first_step["s2"] == 1 and first_step["s3"] > 2  # s3 joined while s2 ran
    s2_steps = {int(r["micro_step"]) for r in losses_rows(tmp_path / "s") if r["adapter"] == "s2"}
    assert first_step["s3"] in s2_steps  # co-located with s2
    for a in run.registry:  # each its own stream: its task's samples in its seed's order, from the first
        expected = DataStream.shuffled(run.train_seqs["t"], a.config.seed).sequences
        assert len(expected) == len(run.trainer.data[a.id].sequences)
        assert all(torch.equal(x, y) for x, y in zip(run.trainer.data[a.id].sequences, expected))
    # The same three configurations as a grid run (explicit adapters): each trains alike (isolation).
    grid = parse_sweep(json.dumps(sweep_doc(tmp_path, "g", adapters=[
        {"id": aid, **{k: v for k, v in a.config.to_dict().items()}} for aid, a in
        ((a.id, a) for a in run.registry)])))
    monkeypatch.setitem(search_mod.SEARCHERS, "grid", Grid)
    (tmp_path / "g").mkdir()
    reference = SweepRun(grid, tmp_path / "g")
    assert reference.run(log=quiet)
    for a in run.registry:
        assert a.losses == pytest.approx(reference.registry[a.id].losses, rel=1e-10, abs=0)
        assert a.eval_losses == pytest.approx(reference.registry[a.id].eval_losses, rel=1e-10, abs=0)
        for path, tensors in run.final_weights(a.id).items():
            for name, t in tensors.items():
                torch.testing.assert_close(t, reference.final_weights(a.id)[path][name], rtol=1e-10, atol=1e-12)


def test_a_run_stopped_at_a_checkpoint_resumes_its_searcher_and_ends_bit_for_bit(tmp_path, monkeypatch):
    sweep = parse_sweep(json.dumps(sweep_doc(tmp_path, "whole", adapters=[{"id": "s1"}])))
    whole, done = run_with(monkeypatch, sweep, tmp_path / "whole")
    assert done
    proposed_at = min(int(r["micro_step"]) for r in losses_rows(tmp_path / "whole") if r["adapter"] == "s3")
    sweep = parse_sweep(json.dumps(sweep_doc(tmp_path, "cut", adapters=[{"id": "s1"}])))
    cut, done = run_with(monkeypatch, sweep, tmp_path / "cut", until=proposed_at + 1)
    assert not done and "s3" in {a.id for a in cut.registry}  # stopped with a proposal of the run's own
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert state["search"]["t"]["lrs"] == cut.search.searchers["t"].lrs
    resumed, done = run_with(monkeypatch, sweep, tmp_path / "cut", resume=True)
    assert done
    assert resumed.search.searchers["t"].state() == whole.search.searchers["t"].state()
    assert [a.id for a in resumed.registry] == [a.id for a in whole.registry]
    for a in whole.registry:
        assert resumed.registry[a.id].losses == a.losses and resumed.registry[a.id].eval_losses == a.eval_losses
        for path, tensors in whole.final_weights(a.id).items():
            for name, t in tensors.items():
                assert torch.equal(resumed.final_weights(a.id)[path][name], t)
    assert (tmp_path / "cut" / "losses.csv").read_text() == (tmp_path / "whole" / "losses.csv").read_text()


def _searched_on_ranks(doc, run_dir):
    """One rank of a Successive search over two ranks: rank 0 asks and tells, every rank queues
    what it proposed (alto.parallel.launch's ranks)."""
    from alto.parallel import Group

    search_mod.SEARCHERS["grid"] = Successive
    group = Group.from_env("cpu")
    try:
        run = SweepRun(parse_sweep(json.dumps(doc)), run_dir, group)
        assert run.run(log=quiet)
        return {a.id: (a.status.value, a.losses, a.eval_losses) for a in run.registry}
    finally:
        group.close()


def test_proposals_reach_every_rank(tmp_path, monkeypatch):
    from alto.parallel import launch

    one, done = run_with(monkeypatch, parse_sweep(json.dumps(sweep_doc(tmp_path, "one", adapters=[{"id": "s1"}]))),
                         tmp_path / "one")
    assert done
    doc = sweep_doc(tmp_path, "two", adapters=[{"id": "s1"}], max_running=1)  # one per rank: s3 runs on s1's
    (tmp_path / "two").mkdir()
    ranks = launch(_searched_on_ranks, 2, (doc, tmp_path / "two"))
    assert ranks[0] == ranks[1]  # the same registry on both ranks, proposals included
    assert list(ranks[0]) == ["s1", "s2", "s3"]
    for a in one.registry:
        status, losses, evals = ranks[0][a.id]
        assert status == "finished"
        assert losses == pytest.approx(a.losses, rel=1e-10, abs=0) and evals == pytest.approx(a.eval_losses, rel=1e-10, abs=0)


def test_optuna_is_imported_only_by_a_sweep_that_searches():
    """alto.search.SEARCHERS names Optuna's searcher by module: a grid sweep's process never imports
    optuna (1.2 s without bytecode); a task with a search section gets it."""
    import subprocess
    import sys

    code = ("import sys\nfrom alto.search import searcher_of\nfrom alto.sweep import parse_sweep\n"
            "import alto.sweep_run\nassert 'optuna' not in sys.modules, 'imported with the run'\n"
            "grid = next(iter(parse_sweep(sys.argv[1]).tasks.values()))\n"
            "assert searcher_of(grid).name == 'grid' and 'optuna' not in sys.modules\n"
            "searched = next(iter(parse_sweep(sys.argv[2]).tasks.values()))\n"
            "assert searcher_of(searched).name == 'optuna' and 'optuna' in sys.modules\n")
    base = {"name": "s", "model": {"random_llama": {}}, "data": {"source": "chatterbot"}}
    grid = json.dumps({**base, "grid": {"lr": [1e-3]}})
    searched = json.dumps({**base, "search": {"sampler": "random", "trials": 2, "space": {"lr": [1e-3, 3e-3]}}})
    proc = subprocess.run([sys.executable, "-c", code, grid, searched], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
