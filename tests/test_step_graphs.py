"""Training steps replayed as CUDA graphs (alto.step_graphs) train as eager steps do: the same
losses and weights, bit for bit where two eager runs are (else within their own gap: atomic
additions), with gradient accumulation, an adapter finishing and another admitted mid-run (the
packs change: the graphs are dropped and made anew). The comparison catches a replay that reads
stale inputs or hands out the graph's own gradient buffers (test_the_comparison_catches_planted_bugs)."""
import copy
import math
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import alto_ext  # noqa: E402
from alto import step_graphs  # noqa: E402
from alto.model import MultiLoraModel, StepPlan  # noqa: E402
from alto.registry import AdapterConfig, Registry  # noqa: E402
from alto.step_buckets import bucket  # noqa: E402
from alto.train import DataStream, Trainer  # noqa: E402
from alto_ext.segments import to_device  # noqa: E402

pytestmark = pytest.mark.cuda
VOCAB, PAD, LENGTH, STEPS = 512, 0, 48, 10
CONFIGS = {
    "a": AdapterConfig(rank=8, alpha=16, lr=1e-3, micro_batch_size=2, seed=1, max_steps=100,
                       target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "b": AdapterConfig(rank=16, alpha=16, lr=2e-3, micro_batch_size=1, grad_accum=2, seed=2, max_steps=100,
                       target_modules=("q_proj", "v_proj", "down_proj")),
    "c": AdapterConfig(rank=4, alpha=8, lr=3e-3, micro_batch_size=1, seed=3, max_steps=4,
                       target_modules=("up_proj", "o_proj")),  # finishes at micro-step 4
    "d": AdapterConfig(rank=32, alpha=32, lr=1e-3, micro_batch_size=1, seed=4, max_steps=100,
                       target_modules=("q_proj", "gate_proj")),  # admitted at micro-step 6
}


@pytest.fixture(autouse=True)
def _sync_checks():  # (conftest's turns them on: every op would wait, and no step could be captured)
    alto_ext.set_sync_checks(False)
    yield


@pytest.fixture(autouse=True)
def _unpadded(monkeypatch):
    """Steps as they come (the tests of padded steps turn it on): a padded step's float sums differ in their
    last bits from the eager unpadded step these tests compare graphs with."""
    monkeypatch.setattr(step_graphs, "BUCKETS", False)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=PAD)
    return transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def train(base, monkeypatch, graphs: bool, host_bound: float = 0.0, before_step=None,
          lengths: tuple[int, int] = (LENGTH, LENGTH)) -> tuple[Trainer, dict[str, list[float]]]:
    """STEPS micro-steps of CONFIGS on sequences of one length (every step's layout repeats; lengths: drawn
    from that range instead), fresh tokens each time; graphs: captured and replayed where a step repeats
    (else eager); host_bound 0: captured whether or not the host held the GPU up; before_step(trainer,
    step) before each."""
    monkeypatch.setattr(step_graphs, "ENABLED", graphs)
    monkeypatch.setattr(step_graphs, "HOST_BOUND", host_bound)
    rng = random.Random(5)
    data = {aid: DataStream([[rng.randrange(1, VOCAB) for _ in range(rng.randint(*lengths))] for _ in range(24)])
            for aid in CONFIGS}
    reg = Registry()
    trainer = Trainer(MultiLoraModel(copy.deepcopy(base)), reg, data, PAD, device="cuda")
    trainer.admit([reg.add(aid, CONFIGS[aid]) for aid in "abc"])
    losses = {aid: [] for aid in CONFIGS}
    for step in range(STEPS):
        if step == 6:
            trainer.admit([reg.add("d", CONFIGS["d"])])
        if before_step is not None:
            before_step(trainer, step)
        for aid, loss in trainer.step().items():
            losses[aid].append(loss)
    return trainer, losses


def record_replays(monkeypatch) -> list[int]:
    """A list that grows by one at every graph replay."""
    replays, replay = [], step_graphs._Graph.replay
    monkeypatch.setattr(step_graphs._Graph, "replay", lambda self, *a: replays.append(1) or replay(self, *a))
    return replays


def record_padding(monkeypatch) -> list[bool]:
    """Each StepGraphs.buckets answer (whether a step is padded), in order."""
    padded, buckets = [], step_graphs.StepGraphs.buckets
    monkeypatch.setattr(step_graphs.StepGraphs, "buckets",
                        lambda self, *a: padded.append(buckets(self, *a)) or padded[-1])
    return padded


def weights(trainer: Trainer) -> dict[str, dict]:
    out = {aid: state.weights for aid, state in trainer.retired.items()}
    out.update({aid: trainer.model.adapter_weights(aid) for aid in trainer.model.configs})
    return out


def gap(run0, run1) -> float:
    """The largest difference between two runs' losses and final weights, relative to the larger of
    each (0.0: bit for bit the same)."""
    (t0, l0), (t1, l1) = run0, run1
    pairs = [(torch.tensor(l0[aid], dtype=torch.float64), torch.tensor(l1[aid], dtype=torch.float64)) for aid in CONFIGS]
    w0, w1 = weights(t0), weights(t1)
    pairs += [(t.double().cpu(), w1[aid][layer][name].double().cpu())
              for aid in CONFIGS for layer, tensors in w0[aid].items() for name, t in tensors.items()]
    if any(a.shape != b.shape for a, b in pairs):  # (an adapter failed in one run: its losses end early)
        return math.inf
    return max(float((a - b).abs().nan_to_num(math.inf).max() / a.abs().max().clamp_min(1e-30)) for a, b in pairs)


@pytest.fixture(scope="module")
def eager(base):
    """Two eager runs, and their gap: 0.0 where every kernel is deterministic; else what the
    nondeterministic ones (atomic additions) leave, which a graph's replay of them leaves too."""
    with pytest.MonkeyPatch.context() as mp:
        first = train(base, mp, graphs=False)
        return first, gap(first, train(base, mp, graphs=False))


def test_graphed_steps_train_as_eager_steps(base, eager, monkeypatch):
    (run, noise) = eager
    replays = record_replays(monkeypatch)
    graphed = train(base, monkeypatch, graphs=True)
    assert gap(run, graphed) <= 4 * noise, f"eager runs differ by {noise:.3g}"
    # a,b,c: micro-steps 0 (first run), 1 (captured), 2-3 replayed; c finishes at 3 (the packs change); a,b
    # again at 4 (first run), 5 (captured); a,b,d from 6: first run, captured, then 8-9 replayed
    assert len(replays) == 4
    assert graphed[0].registry["c"].status.name == "FINISHED"


@pytest.mark.parametrize("bug", ["stale token ids", "the graph's own gradient buffers"])
def test_the_comparison_catches_planted_bugs(base, eager, monkeypatch, bug):
    (run, noise) = eager
    replay = step_graphs._Graph.replay

    def planted(self, step, weights, packs):
        if bug == "stale token ids":  # the new step's ids never reach the graph
            step.inputs["input_ids"] = self.step.inputs["input_ids"]
        losses = replay(self, step, weights, packs)
        if bug == "the graph's own gradient buffers":  # the next replay writes over a pending gradient (b's)
            for pack, grad in zip(packs, self.grads):
                pack.grad = grad
        return losses

    monkeypatch.setattr(step_graphs._Graph, "replay", planted)
    assert gap(run, train(base, monkeypatch, graphs=True)) > max(100 * noise, 1e-3)


VARIABLE = (40, 48)  # 4 sequences a step (3 between c's end and d's start), padded to a few buckets (alto.step_buckets)


@pytest.fixture(scope="module")
def eager_bucketed(base):
    """Two eager runs on sequences of variable lengths, every step padded to its bucket (as a graphed run
    pads these small steps: StepGraphs.buckets asks ENABLED), and their gap."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_graphs.StepGraphs, "buckets", lambda *_: True)
        first = train(base, mp, graphs=False, lengths=VARIABLE)
        return first, gap(first, train(base, mp, graphs=False, lengths=VARIABLE))


@pytest.mark.parametrize("bug", [None, "no refresh of the token ranges", "a capture not replayed"])
def test_steps_of_variable_lengths_are_padded_to_buckets_and_replayed(base, eager_bucketed, monkeypatch, bug):
    """No layout of variable-length data repeats: these small steps are padded to their buckets, whose
    layouts repeat, and replayed; they train as the eager padded run
    (and that one as the unpadded math: tests/test_step_buckets.py). Each new layout is captured the first
    time it is seen, and but for the first (the capture stream's warm-up) without an eager run: the
    capture's replay computes it. Caught: a replay that kept the captured step's token ranges
    (StepPlan.refresh skipped), and a step captured and not replayed (its losses and gradients the
    graph's unwritten buffers)."""
    import alto.train

    (run, noise) = eager_bucketed
    monkeypatch.setattr(step_graphs, "BUCKETS", True)
    replays, padded = record_replays(monkeypatch), record_padding(monkeypatch)
    run_pass, eager_passes = alto.train.run_pass, []

    def counted(model, step):
        eager_passes.append(not torch.cuda.is_current_stream_capturing())
        return run_pass(model, step)

    monkeypatch.setattr(alto.train, "run_pass", counted)
    if bug == "no refresh of the token ranges":
        monkeypatch.setattr(StepPlan, "refresh", lambda self, other: None)
    if bug == "a capture not replayed":
        def unreplayed(self, key, step, compute, weights, packs):
            graph = self._record(key, step, compute, weights, packs)
            for pack, grad in zip(packs, graph.grads):
                pack.grad = None if grad is None else grad.clone()
            return graph.losses.clone()
        monkeypatch.setattr(step_graphs.StepGraphs, "_capture_and_replay", unreplayed)
    graphed = train(base, monkeypatch, graphs=True, lengths=VARIABLE)
    assert padded == [True] * STEPS
    assert graphed[0].last_positions == bucket(graphed[0].last_positions)  # the bucket's, as admission reads them
    if bug:  # (unwritten buffers may fail adapters: the counts below need not hold)
        assert gap(run, graphed) > max(100 * noise, 1e-3)
        return
    assert len(replays) >= 2, "too few replays: the test would not test them"
    counts = graphed[0].graphs.counts
    assert counts["eager"] == 0 and counts["captured"] + counts["replayed"] == STEPS
    assert sum(eager_passes) == 1 and counts["captured"] >= 3  # (new packs at 4 and 6: captured anew)
    assert gap(run, graphed) <= 4 * noise, f"eager runs differ by {noise:.3g}"


def train_out_of_memory_at(base, monkeypatch, n: int) -> tuple[list[tuple[int, bool, bool]], tuple]:
    """A padded run (train, VARIABLE lengths) whose n-th pass (from 1) runs out of memory: each pass's (step,
    padded, captured), and the run."""
    import alto.train

    monkeypatch.setattr(step_graphs, "BUCKETS", True)
    run_pass, passes, current = alto.train.run_pass, [], [0]

    def out_of_memory(model, step):
        passes.append((current[0], step.plan.bucketed, torch.cuda.is_current_stream_capturing()))
        if len(passes) == n:
            raise torch.OutOfMemoryError("planted")
        return run_pass(model, step)

    monkeypatch.setattr(alto.train, "run_pass", out_of_memory)
    return passes, train(base, monkeypatch, graphs=True, lengths=VARIABLE,
                         before_step=lambda t, s: current.__setitem__(0, s))


def test_a_padded_step_out_of_memory_runs_again_unpadded(base, monkeypatch):
    """The padding is outside admission's memory model: a padded step that runs out of memory as it is
    captured (the first new layout after step 0's, captured at first sight without an eager run) runs
    again unpadded before its size is counted as too large (no StepOutOfMemory), and no step is padded
    until the adapters change (c ends at 3, d is admitted at 6)."""
    padded = record_padding(monkeypatch)
    passes, (trainer, losses) = train_out_of_memory_at(base, monkeypatch, 3)
    assert passes[:2] == [(0, True, False), (0, True, True)]  # step 0 run eagerly (the stream's warm-up), captured
    k = passes[2][0]
    assert passes[2] == (k, True, True) and passes[3] == (k, False, False) and k < 6  # out of memory; again unpadded
    change = 4 if k < 4 else 6
    assert padded[:change + 2] == [True] * (k + 1) + [False] * (change - k) + [True]  # (step k asked twice)
    assert all(math.isfinite(v) for values in losses.values() for v in values)


def test_a_step_the_host_does_not_hold_up_stays_eager(base, eager, monkeypatch):
    """Timed on its first run: where its host time is below HOST_BOUND x its GPU time (here: always),
    never captured, and trained as the eager run was."""
    captures = []
    capture = step_graphs.StepGraphs._capture
    monkeypatch.setattr(step_graphs.StepGraphs, "_capture", lambda *a: captures.append(1) or capture(*a))
    trainer, losses = train(base, monkeypatch, graphs=True, host_bound=float("inf"))
    assert captures == [] and trainer.graphs.eager
    assert gap(eager[0], (trainer, losses)) <= 4 * eager[1]


@pytest.mark.parametrize("padded", [False, True])
def test_a_step_that_cannot_be_captured_runs_eagerly(base, eager, eager_bucketed, monkeypatch, padded):
    """An op that waits for the GPU inside the step: its capture fails with a warning, the step and
    the later ones run eagerly, and the trainer's stream is the one it had. Padded: each new layout, recorded
    at first sight on the warm capture stream, fails there too and runs eagerly as the first did."""
    import alto.train

    monkeypatch.setattr(step_graphs, "BUCKETS", padded)
    run_pass = alto.train.run_pass

    def waiting(model, step):
        token_loss = run_pass(model, step)
        token_loss.sum().item()  # a read on the host: not capturable
        return token_loss

    monkeypatch.setattr(alto.train, "run_pass", waiting)
    with pytest.warns(UserWarning, match="could not be captured"):
        trainer, losses = train(base, monkeypatch, graphs=True, lengths=VARIABLE if padded else (LENGTH, LENGTH))
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert not trainer.graphs.graphs
    (run, noise) = eager_bucketed if padded else eager
    assert gap(run, (trainer, losses)) <= 4 * noise


def test_the_capture_stream_is_warm_once_a_step_ran_on_it(base, monkeypatch):
    """The first padded step runs eagerly on the capture stream (the warm-up torch.cuda asks for) before it is
    recorded. Where that run is out of memory (run again unpadded, padding held off until the adapters change
    at 4), the stream is not yet warm: the next padded step runs eagerly on it before its recording too."""
    passes, _ = train_out_of_memory_at(base, monkeypatch, 1)
    assert passes[:2] == [(0, True, False), (0, False, False)]  # out of memory on the capture stream; again unpadded
    k = next(i for i, (_, bucketed, _) in enumerate(passes) if i > 0 and bucketed)
    assert passes[k][0] == 4 and passes[k:k + 2] == [(4, True, False), (4, True, True)]  # warm-up, then recorded


def test_out_of_memory_while_graphs_are_held_runs_the_step_again_without_them(base, eager, monkeypatch):
    """The graphs' memory pools are outside admission's memory model: a step that runs out of memory
    while one is held (micro-step 3: a,b,c's graph, captured at 1) drops them and runs once more,
    eagerly, before it is counted as too large, and no graph is taken until the adapters change (c
    finishes at 3); training goes on as the eager run's. Without graphs held, the out-of-memory step
    is undone and reported (StepOutOfMemory), once."""
    from alto.train import StepOutOfMemory

    faults, held_off = [], []

    def out_of_memory(trainer, step, times):
        def fault(running):
            if len(faults) < times:
                faults.append(bool(trainer.graphs.graphs))
                raise torch.OutOfMemoryError("planted")
        trainer.inject_fault = fault if step == 3 else None
        held_off.append(trainer.graphs.held_off)

    trainer, losses = train(base, monkeypatch, graphs=True, before_step=lambda t, s: out_of_memory(t, s, 1))
    assert faults == [True]  # the graph was held when memory ran out; the step was not reported
    assert held_off[3:5] == [False, True] and not any(held_off[5:])  # until the packs changed at 4
    assert trainer.graphs.graphs  # taken again after
    assert gap(eager[0], (trainer, losses)) <= 4 * eager[1]

    faults.clear()
    with pytest.raises(StepOutOfMemory):  # (the retry is the one that fails)
        train(base, monkeypatch, graphs=True, before_step=lambda t, s: out_of_memory(t, s, 2))
    assert faults == [True, False]  # run once more without graphs, then reported


def test_no_host_data_is_sent_while_a_graph_is_captured():
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="while a CUDA graph is captured"):
        with torch.cuda.graph(graph):
            to_device([1, 2, 3], "cuda")


@pytest.mark.parametrize("lengths", [(16, 16), (13, 16)])
def test_a_killed_graphed_run_resumes_to_the_same_weights(tmp_path, sweep_yaml, monkeypatch, lengths):
    """`alto tune` on the GPU with fixed-length or variable-length data (its small steps padded to
    buckets, whose layouts repeat, and replayed as graphs),
    killed after micro-step 5 and resumed from its checkpoint at 4, ends with the losses and adapters
    of a run that was not killed: bit for bit where two such runs are (else within their own gap:
    atomic additions in a backward). The resumed run pads its steps as the whole run did."""
    import json

    from safetensors.torch import load_file

    from alto.tune import tune
    from conftest import interrupt

    monkeypatch.setattr(step_graphs, "HOST_BOUND", 0.0)  # captured whether or not the host holds the GPU up
    monkeypatch.setattr(step_graphs, "BUCKETS", True)
    replays, padded = record_replays(monkeypatch), record_padding(monkeypatch)
    rng = random.Random(7)
    records = tmp_path / "records.jsonl"  # byte tokens: a token a character
    texts = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(*lengths))) for _ in range(40)]
    records.write_text("\n".join(json.dumps({"text": text}) for text in texts))
    keys = {"device": "cuda", "checkpoint_every": 4,
            "data": {"source": "jsonl", "path": str(records), "max_length": 24, "eval_fraction": 0.2},
            "defaults": {"micro_batch_size": 2, "max_steps": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}}
    decided = {}
    for out in ("whole", "again"):
        replays.clear(), padded.clear()
        assert tune(str(sweep_yaml(out=out, **keys)), None, log=lambda *_: None) == 0
        assert replays, "no step was replayed: the test would not test graphs"
        decided[out] = list(padded)
    assert decided["whole"] == decided["again"] and all(decided["whole"])
    interrupt(sweep_yaml(out="cut", **keys), 5)
    replays.clear(), padded.clear()
    assert tune(None, str(tmp_path / "cut"), log=lambda *_: None) == 0
    assert replays
    assert 0 < len(padded) < len(decided["whole"]) and padded == decided["whole"][-len(padded):]  # as the whole run

    def outcome(run: str) -> list[torch.Tensor]:
        rows = (tmp_path / run / "losses.csv").read_text().splitlines()[1:]
        losses = torch.tensor([float(row.split(",")[3]) for row in rows], dtype=torch.float64)  # its loss column
        files = sorted((tmp_path / run / "adapters").glob("*/adapter_model.safetensors"))
        adapters = [load_file(str(path)) for path in files]
        return [losses] + [t.double() for weights in adapters for _, t in sorted(weights.items())]

    def gap(a: str, b: str) -> float:
        return max(float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)) for x, y in zip(outcome(a), outcome(b)))

    noise = gap("whole", "again")
    assert len(outcome("cut")) == len(outcome("whole")) == 1 + 4 * 3 * 2 * 2  # losses; 4 x 3 modules x 2 layers x A, B
    assert gap("whole", "cut") <= 4 * noise, f"two uninterrupted runs differ by {noise:.3g}"
