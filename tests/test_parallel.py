"""Rank-local adapter parallelism on the CPU: placement, the flat-buffer transfer ops, and whole
sweeps on 2 gloo processes that must give every adapter the trajectory it has on one process,
through a migration, a kill and a resume."""
import json
import os
import random

import pytest
import torch

pytest.importorskip("transformers")

import alto_ext  # noqa: E402
from alto.parallel import launch  # noqa: E402
from alto.sched.placement import place, rank_loads, rebalance  # noqa: E402
from alto.tune import tune  # noqa: E402
from conftest import TINY_LLAMA, interrupt, write_word_records  # noqa: E402



# ---- placement ------------------------------------------------------------------------------------

def test_place_is_longest_first_onto_the_least_loaded_rank():
    costs = {"a": 4.0, "b": 3.0, "c": 3.0, "d": 2.0, "e": 2.0}
    loads = [0.0, 0.0]
    owner = place(costs, costs, loads)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}
    assert loads == [8.0, 6.0] == rank_loads(owner, costs, 2)


def test_place_random_loads_stay_within_the_largest_cost_of_each_other():
    rng = random.Random(0)
    for _ in range(50):
        world = rng.randint(2, 8)
        costs = {f"a{i}": rng.uniform(1, 10) for i in range(rng.randint(1, 40))}
        loads = rank_loads(place(costs, costs, [0.0] * world), costs, world)
        assert max(loads) - min(loads) <= max(costs.values()) + 1e-9  # LPT's guarantee


def test_rebalance_moves_work_to_an_emptied_rank_and_stops_when_even():
    costs = {"b": 1.0, "c": 1.1, "d": 1.2}
    moves = rebalance({"b": 1, "c": 1, "d": 1}, costs, 2)
    assert moves == [("d", 1, 0)]  # the one move that evens the pair best (peak 3.3 -> 2.1)
    assert rebalance({"b": 0, "c": 1, "d": 1}, costs, 2) == [("c", 1, 0)]  # peak 2.3 -> 2.1
    assert rebalance({"b": 0, "c": 1}, costs, 2) == []  # moving c would only swap the peak
    assert rebalance({"b": 0, "c": 1, "e": 1}, {**costs, "e": 0.05}, 2) == []  # 1.15 -> 1.1: < 5%


# ---- the transfer ops -------------------------------------------------------------------------------

def test_pack_and_unpack_round_trip_every_dtype_and_shape():
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randint(0, 255, (11,), dtype=torch.uint8),
               torch.randn(2, 0), torch.randn(4, 3).t(), torch.randn(6, dtype=torch.float64).to(torch.bfloat16)]
    flat = alto_ext.pack_tensors(tensors)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for t in tensors)
    outs = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
    alto_ext.unpack_tensors(flat, outs)
    for t, o in zip(tensors, outs):
        assert torch.equal(t, o)


def test_unpack_refuses_a_buffer_of_the_wrong_size():
    flat = alto_ext.pack_tensors([torch.randn(4)])
    with pytest.raises(ValueError, match="holds 16 bytes but outs need 20"):
        alto_ext.unpack_tensors(flat, [torch.empty(5)])
    with pytest.raises(ValueError, match="at least one tensor"):
        alto_ext.pack_tensors([])


def _send_recv(shapes):
    import torch.distributed as dist

    from alto.parallel import Group

    group = Group.from_env("cpu")
    try:
        torch.manual_seed(1)
        sent = [torch.randn(s) for s in shapes]
        if group.rank == 0:
            alto_ext.send_tensors(sent, 1)
            dist.barrier()
            return 0
        got = [torch.empty(s) for s in shapes]
        alto_ext.recv_tensors(got, 0)
        with pytest.raises(ValueError, match="dst=1 is not another rank"):
            alto_ext.send_tensors(got, 1)
        dist.barrier()
        return int(all(torch.equal(a, b) for a, b in zip(sent, got)))
    finally:
        group.close()


def test_send_and_recv_move_tensors_between_two_processes():
    assert launch(_send_recv, 2, ([(3, 4), (5,), (2, 2)],)) == [0, 1]


def _gloo_threads_after_close():
    """Joins a group, builds a model (transformers imports torch.distributed.nn's functions then, whose
    defaults bind the world group), gathers, closes: the gloo and store threads still alive after."""
    import gc
    from pathlib import Path

    import transformers

    from alto.parallel import Group

    group = Group.from_env("cpu")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    group.all_gather(group.rank)
    group.barrier()
    group.close()
    gc.collect()
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc/self/task")
def test_closing_a_group_joins_its_gloo_threads_before_the_interpreter_exits():
    # Left running into the interpreter's exit, a gloo thread waiting for the GIL aborted a rank in CI
    # ("terminate called without an active exception").
    assert launch(_gloo_threads_after_close, 2) == [[], []]


def _rank_1_fails():
    from alto.parallel import Group

    group = Group.from_env("cpu")
    if group.rank == 1:
        raise RuntimeError("rank 1 breaks")
    group.all_gather(0)  # rank 0 would wait here forever
    return 0


def test_a_failing_rank_stops_the_others_instead_of_hanging():
    with pytest.raises(RuntimeError, match=r"rank [01] exited with code 1"):  # rank 0 may see it first
        launch(_rank_1_fails, 2)


def _abort_in_rank():
    import os

    if int(os.environ["RANK"]) == 1:
        os.abort()  # as a C++ std::terminate would
    return 0


def test_a_rank_that_aborts_prints_its_python_stack(capfd):
    with pytest.raises(RuntimeError, match=r"rank 1 exited with code -6"):
        launch(_abort_in_rank, 2)
    err = capfd.readouterr().err
    assert "Fatal Python error: Aborted" in err and "_abort_in_rank" in err


def _train_moving(device, move_at: int | None, steps: int = 6):
    """Two adapters on one trainer; at micro-step `move_at` adapter d takes the migration path short
    of the network: released, its state packed into one flat buffer on `device`, unpacked into the
    tensors of a freshly admitted copy (the receiver's template) and admitted again."""
    import transformers

    from alto.model import MultiLoraModel
    from alto.registry import AdapterConfig, Registry
    from alto.train import DataStream, Trainer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, pad_token_id=0, attn_implementation="eager", **TINY_LLAMA)
    model = MultiLoraModel(transformers.LlamaForCausalLM(cfg).to(device).eval())
    rng = random.Random(5)
    data = {aid: DataStream([[rng.randrange(1, 96) for _ in range(rng.randrange(3, 12))] for _ in range(16)])
            for aid in "de"}
    reg = Registry()
    trainer = Trainer(model, reg, data, 0, device=device)
    common = {"lr": 3e-3, "max_steps": 100, "target_modules": ("q_proj", "v_proj", "down_proj")}
    trainer.admit([reg.add("d", AdapterConfig(rank=4, micro_batch_size=2, grad_accum=2, dropout=0.1, seed=1, **common)),
                   reg.add("e", AdapterConfig(rank=2, micro_batch_size=1, seed=2, **common))])
    for step in range(steps):
        if step == move_at:
            flat = alto_ext.pack_tensors([t.to(device) for t in trainer.release(["d"])["d"].tensors()])
            trainer.admit([reg["d"]])  # fresh weights and moments: what the receiving rank starts from
            template = trainer.release(["d"])["d"]
            outs = [torch.empty_like(t, device=device) for t in template.tensors()]
            alto_ext.unpack_tensors(flat, outs)
            outs[-1] = outs[-1].cpu()  # generator states live on the CPU
            trainer.admit([reg["d"]], {"d": template.with_tensors(outs)})
        trainer.step()
    return {aid: (reg[aid].losses, model.adapter_weights(aid)) for aid in "de"}


def test_an_adapter_moved_as_one_flat_buffer_continues_bit_for_bit(device):
    """Moved mid-accumulation (pending gradients, Adam moments, step, data position and dropout
    RNG all travel): the same losses and weights, exactly, as without the move. On the GPU this is
    the whole migration path but the NCCL send/recv."""
    moved, still = _train_moving(device, move_at=3), _train_moving(device, move_at=None)
    for aid in "de":
        assert moved[aid][0] == still[aid][0], aid
        for path, tensors in still[aid][1].items():
            for name, t in tensors.items():
                assert torch.equal(moved[aid][1][path][name], t), (aid, path, name)


# ---- whole sweeps on 2 processes ---------------------------------------------------------------------

def write_sweep(tmp_path, out: str, more_adapters=(), **extra) -> str:
    data = write_word_records(tmp_path / "data.jsonl", max_words=6)
    # a (4 samples per step) fills rank 0 and ends after 2 steps; b, c, d share rank 1 until one of
    # them migrates to the emptied rank 0, mid-accumulation and with dropout (its RNG moves too).
    slow = {"micro_batch_size": 1, "max_steps": 2, "grad_accum": 3, "dropout": 0.1}
    # float64 (exact math): runs whose steps are shaped differently (other ranks, other
    # co-located adapters) agree to ~1e-15, so the float32 exports and 6-decimal losses compared
    # below match within their own rounding, whatever the library versions.
    doc = {"name": "p", "model": {"random_llama": TINY_LLAMA}, "base": {"dtype": "float64"}, "device": "cpu", "checkpoint_every": 2,
           "output": str(tmp_path / out),
           "data": {"source": "jsonl", "path": str(data), "max_length": 24, "eval_fraction": 0.2},
           "defaults": {"target_modules": ["q_proj", "v_proj"], "lr": 3e-3},
           "adapters": [{"id": "a", "rank": 4, "micro_batch_size": 4, "max_steps": 2, "seed": 0},
                        {"id": "b", "rank": 2, "seed": 1, **slow}, {"id": "c", "rank": 4, "seed": 2, **slow},
                        {"id": "d", "rank": 8, "seed": 3, **slow, "target_modules": ["q_proj", "k_proj", "o_proj"]},
                        *more_adapters],
           **extra}
    path = tmp_path / f"{out}.yaml"
    path.write_text(json.dumps(doc))
    return str(path)


def losses_by_adapter(run_dir) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in (run_dir / "losses.csv").read_text().splitlines()[1:]:
        _, aid, _, loss = line.split(",")
        out.setdefault(aid, []).append(float(loss))
    return out


def assert_same_adapters(a, b, ids="abcd"):
    from safetensors.torch import load_file

    la, lb = losses_by_adapter(a), losses_by_adapter(b)
    assert la.keys() == lb.keys() == set(ids)
    for aid in ids:
        assert la[aid] == pytest.approx(lb[aid], rel=1e-5, abs=1e-6), aid
        wa = load_file(str(a / "adapters" / aid / "adapter_model.safetensors"))
        wb = load_file(str(b / "adapters" / aid / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=f"{aid} {k}")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    assert tune(write_sweep(tmp, "one"), None, log=lambda *_: None) == 0
    return tmp / "one"


def test_two_ranks_give_every_adapter_its_single_process_trajectory(tmp_path, single_run, capfd):
    assert tune(write_sweep(tmp_path, "two"), None, nproc=2) == 0
    out = capfd.readouterr().out  # the ranks' processes print to the inherited stdout
    assert "x 2 ranks" in out
    assert "move d: rank 1 -> rank 0" in out  # the emptied rank took work: a real migration
    assert_same_adapters(single_run, tmp_path / "two")
    board = (tmp_path / "two" / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 5 and all(",finished," in row for row in board[1:])


def test_three_ranks_and_a_resume_on_four(tmp_path, single_run):
    """Uneven splits: 4 adapters on 3 ranks, stopped, then resumed on 4 ranks (one gets nothing)."""
    path = write_sweep(tmp_path, "three")
    assert tune(path, None, stop_after=4, nproc=3, log=lambda *_: None) == 0
    assert tune(None, str(tmp_path / "three"), nproc=4, log=lambda *_: None) == 0
    assert_same_adapters(single_run, tmp_path / "three")


def test_two_rank_run_killed_and_resumed_matches(tmp_path, single_run):
    path = write_sweep(tmp_path, "cut")
    # Killed after micro-step 5 (checkpoint at 4: d had migrated at 2, mid-accumulation).
    interrupt(path, 5, nproc=2)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["micro_steps"] == 4
    assert not (tmp_path / "cut" / "leaderboard.csv").exists()
    assert tune(None, str(tmp_path / "cut"), nproc=2, log=lambda *_: None) == 0
    assert_same_adapters(single_run, tmp_path / "cut")


def test_two_rank_checkpoint_resumes_on_one_process(tmp_path, single_run):
    path = write_sweep(tmp_path, "cut1")
    assert tune(path, None, stop_after=3, nproc=2, log=lambda *_: None) == 0
    assert tune(None, str(tmp_path / "cut1"), log=lambda *_: None) == 0
    assert_same_adapters(single_run, tmp_path / "cut1")


def test_monitor_decisions_and_admissions_on_two_ranks_match_one(tmp_path):
    """Rank 0 decides (held-out loss gathered from both ranks) and broadcasts: the same stops, and
    the queued config e admitted into the freed slot at the same step, as on one process with the
    same total slots (max_running is per rank)."""
    e = [{"id": "e", "rank": 2, "seed": 4, "micro_batch_size": 1, "max_steps": 4}]  # queued last (largest micro-batch first)
    monitor = {"rule": "halving", "grace": 2, "eta": 2, "signal": "eval", "eval_every": 2}
    one = write_sweep(tmp_path, "m1", e, monitor=monitor, max_running=4)
    two = write_sweep(tmp_path, "m2", e, monitor=monitor, max_running=2)
    assert tune(one, None, log=lambda *_: None) == 0
    assert tune(two, None, nproc=2, log=lambda *_: None) == 0
    d1 = (tmp_path / "m1" / "decisions.csv").read_text()
    assert d1 == (tmp_path / "m2" / "decisions.csv").read_text() and len(d1.splitlines()) > 1
    first = {aid: min(int(r.split(",")[0]) for r in (tmp_path / "m1" / "losses.csv").read_text().splitlines()[1:]
                      if r.split(",")[1] == aid) for aid in "abcde"}
    assert first["e"] > 1  # e waited in the queue for a freed slot
    assert_same_adapters(tmp_path / "m1", tmp_path / "m2", ids="abcde")


# ---- a sharded frozen base (FSDP2) -------------------------------------------------------------------

def eval_losses(run_dir) -> dict[str, float]:
    rows = (run_dir / "leaderboard.csv").read_text().splitlines()[1:]
    return {r.split(",")[3]: float(r.split(",")[8]) for r in rows}


@pytest.mark.parametrize("nproc", [2, 4])
def test_a_sharded_base_gives_every_adapter_its_unsharded_trajectory(tmp_path, single_run, capfd, nproc):
    """The decoder layers sharded over 2 or 4 gloo processes, adapters rank-local: bit for bit the
    losses, exports and held-out losses of the same ranks over a replicated base (the gathered
    layers are the whole weights: the same float64 math in the same order; a 1e-6 change to one
    rank's shard of one layer fails this), and those of one process with the whole base. With 4
    ranks and a ending after 2 steps, ranks sit idle (their passes only gather), and evaluations
    every 2 micro-steps make ranks with nothing to evaluate pass along too."""
    from safetensors.torch import load_file

    assert tune(write_sweep(tmp_path, "s", shard_base=True, eval={"every": 2}), None, nproc=nproc) == 0
    assert f"x {nproc} ranks" in capfd.readouterr().out
    assert tune(write_sweep(tmp_path, "r", eval={"every": 2}), None, nproc=nproc, log=lambda *_: None) == 0
    sharded, replicated = tmp_path / "s", tmp_path / "r"
    assert (sharded / "losses.csv").read_text() == (replicated / "losses.csv").read_text()
    assert (sharded / "leaderboard.csv").read_text() == (replicated / "leaderboard.csv").read_text()
    for aid in "abcd":
        ours, theirs = (load_file(str(run / "adapters" / aid / "adapter_model.safetensors")) for run in (sharded, replicated))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), aid
    assert_same_adapters(single_run, sharded)
    assert eval_losses(sharded) == pytest.approx(eval_losses(single_run), rel=1e-9) and len(eval_losses(sharded)) == 4
    # the base the exports name: loaded again whole by the sharded run's rank 0, the same bytes
    assert (sharded / "base" / "model.safetensors").read_bytes() == (single_run / "base" / "model.safetensors").read_bytes()


def test_a_sharded_run_scores_greedy_completions_on_every_rank_alike(tmp_path):
    """The final metric decodes greedy completions on every rank (the layers are gathered for each
    pass): the ranks must batch them alike even though their own largest steps differ (micro-batch
    8 on one rank, 1 on the other). The leaderboard equals the replicated run's."""
    rng = random.Random(5)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "lora", "rank"]) for _ in range(rng.randint(lo, hi)))

    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"prompt": words(2, 4) + "?", "completion": " " + words(1, 2)}) for _ in range(60)))
    for out, shard in (("s", True), ("r", False)):
        path = tmp_path / f"{out}.yaml"
        path.write_text(json.dumps({
            "name": "g", "model": {"random_llama": TINY_LLAMA}, "base": {"dtype": "float64"}, "device": "cpu",
            "output": str(tmp_path / out), "max_running": 1, "shard_base": shard,
            "data": {"source": "jsonl", "path": str(qa), "max_length": 48, "eval_fraction": 0.2},
            "eval": {"samples": 12, "metric": "exact_match", "max_new_tokens": 4},
            "defaults": {"max_steps": 2, "target_modules": ["q_proj", "v_proj"]},
            "adapters": [{"id": "a", "rank": 4, "micro_batch_size": 8, "seed": 0},
                         {"id": "b", "rank": 4, "micro_batch_size": 1, "seed": 1}]}))
        assert tune(str(path), None, nproc=2, log=lambda *_: None) == 0
    board = (tmp_path / "s" / "leaderboard.csv").read_text()
    assert board == (tmp_path / "r" / "leaderboard.csv").read_text() and "exact_match" in board


def test_an_nf4_base_shards_too(tmp_path):
    """QLoRA over a sharded base: FSDP2 gathers torchao's NF4 weights (their codes and scales);
    bit for bit the run over the replicated NF4 base."""
    pytest.importorskip("torchao")
    model = {"random_llama": {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 512}}  # NF4 blocks for 2 ranks
    for out, shard in (("s", True), ("r", False)):
        path = write_sweep(tmp_path, out, shard_base=shard, model=model, base={"dtype": "float64", "quantize": "nf4"})
        assert tune(path, None, nproc=2, log=lambda *_: None) == 0
    for name in ("losses.csv", "leaderboard.csv", "base/model.safetensors"):  # base/: NF4 weights dequantized
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "r" / name).read_bytes()


def test_a_sharded_run_resumes_on_another_rank_count(tmp_path, single_run):
    """Stopped on 2 sharded ranks, resumed on 3, then the same on one process (world size 1: the
    same sharded code path over a process group of one)."""
    path = write_sweep(tmp_path, "cut", shard_base=True)
    assert tune(path, None, stop_after=3, nproc=2, log=lambda *_: None) == 0
    assert tune(None, str(tmp_path / "cut"), nproc=3, log=lambda *_: None) == 0
    assert_same_adapters(single_run, tmp_path / "cut")
    path = write_sweep(tmp_path, "cut1", shard_base=True)
    assert tune(path, None, stop_after=3, nproc=2, log=lambda *_: None) == 0
    assert tune(None, str(tmp_path / "cut1"), log=lambda *_: None) == 0
    assert_same_adapters(single_run, tmp_path / "cut1")


def test_world_size_one_shards_over_a_group_of_one(tmp_path):
    from alto.parallel import Group
    from alto.sweep import parse_sweep
    from alto.sweep_run import SweepRun

    group = Group.from_env("cpu", process_group=True)
    try:
        run = SweepRun(parse_sweep(open(write_sweep(tmp_path, "w1", shard_base=True)).read()), tmp_path / "w1", group)
        assert run.sharded
        layer = run.base.model.get_decoder().layers[0]
        assert all(hasattr(p, "to_local") for n, p in layer.named_parameters() if "lora_" not in n)  # FSDP's
        assert not any(hasattr(p, "to_local") for m in run.model.layers.values() for p in m.packs())  # the adapters'
        assert not hasattr(run.base.model.get_input_embeddings().weight, "to_local")  # replicated
    finally:
        group.close()


def test_auto_shards_only_a_base_that_does_not_fit(tmp_path):
    import transformers

    from alto.admission import fits_whole

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=96, **TINY_LLAMA))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert fits_whole(model, torch.device("cpu"), activation_bytes=1e6)
    assert not fits_whole(model, torch.device("cpu"), activation_bytes=1e18 - params)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (bench/device_run.sh on nvidia-h200-x2)")
def test_two_gpus_with_nccl_match_one_gpu(tmp_path, capfd):
    """The same sweep on 2 GPUs (NCCL migration through the extension) and on 1 GPU, bf16 autocast:
    every adapter's losses and weights agree up to bf16 rounding of differently shaped steps."""
    from safetensors.torch import load_file

    gpu = {"device": "cuda", "model": {"random_llama": TINY_LLAMA}}
    one, two = write_sweep(tmp_path, "g1", **gpu), write_sweep(tmp_path, "g2", **gpu)
    assert tune(one, None, log=lambda *_: None) == 0
    assert tune(two, None, nproc=2) == 0
    assert "move d: rank 1 -> rank 0" in capfd.readouterr().out
    la, lb = losses_by_adapter(tmp_path / "g1"), losses_by_adapter(tmp_path / "g2")
    for aid in "abcd":
        assert la[aid] == pytest.approx(lb[aid], rel=2e-2), aid
        wa = load_file(str(tmp_path / "g1" / "adapters" / aid / "adapter_model.safetensors"))
        wb = load_file(str(tmp_path / "g2" / "adapters" / aid / "adapter_model.safetensors"))
        for k in wa:
            assert (wa[k] - wb[k]).norm() <= 5e-2 * wa[k].norm() + 1e-6, (aid, k)
