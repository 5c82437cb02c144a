"""Co-located training is exact: each adapter trained with others gives the same losses and weights
as that adapter trained alone with HF PEFT (same init, data order, hyperparameters), also when
other adapters join or leave mid-run; one adapter's NaN fails only that adapter.

The comparisons with PEFT run in float64 (base, adapters, scales, loss and AdamW all float64 on the
CPU), where both computations are the same math up to rounding at 1e-16: they agree to EXACT_RTOL
on every loss and weight, whatever the torch/transformers/peft versions or the CPU. In float32 they
could not (AdamW turns float noise in a near-zero gradient, eps 1e-8, into a visibly different
weight). The tolerance still bites: test_the_peft_comparison_catches_planted_bugs plants a scaling
off by 1%, one adapter's weight gradient leaking into its neighbour's rows, and a skipped gradient
clip, and requires the comparison to fail on each.
"""
import copy
import dataclasses
import random

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from alto.data import context  # noqa: E402
from alto.model import MultiLoraModel  # noqa: E402
from alto.registry import AdapterConfig, Registry, Status  # noqa: E402
from alto.step import colocated_losses, pad_batch  # noqa: E402
from alto.train import DataStream, Trainer  # noqa: E402
from conftest import EXACT_ATOL, EXACT_RTOL, differences, float64_norms, peft_alone  # noqa: E402

VOCAB, PAD = 96, 0

CONFIGS = {
    "a": AdapterConfig(rank=4, alpha=8, lr=1e-3, micro_batch_size=2, target_modules=("q_proj", "v_proj"), seed=1, max_steps=50),
    "b": AdapterConfig(rank=8, alpha=16, lr=5e-4, micro_batch_size=3, grad_accum=2, use_rslora=True, seed=2,
                       target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), max_steps=50),
    "c": AdapterConfig(rank=1, alpha=4, lr=2e-3, micro_batch_size=1, target_modules=("down_proj", "up_proj"),
                       schedule="linear", warmup_steps=1, weight_decay=0.01, max_grad_norm=0.05, seed=3, max_steps=6),
}
MICRO_STEPS = 6


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=PAD)
    return transformers.LlamaForCausalLM(cfg).double().eval()


@pytest.fixture(scope="module")
def sequences():
    rng = random.Random(7)
    return {aid: [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(4, 17))] for _ in range(12)]
            for aid in CONFIGS}


def colocated(base_model, sequences, ids, events=None, steps=MICRO_STEPS, device="cpu", dtype=None,
              configs=CONFIGS, packed=True):
    """Trains `ids` together; events = {micro_step: [("add"|"remove", id)]}. Returns (trainer, init weights)."""
    model = MultiLoraModel(copy.deepcopy(base_model).to(device, dtype))
    reg = Registry()
    trainer = Trainer(model, reg, {a: DataStream(sequences[a]) for a in configs}, PAD, device=device, packed=packed)
    init = {}

    def add(aid):
        trainer.admit([reg.add(aid, configs[aid])])
        init[aid] = model.adapter_weights(aid)

    for aid in ids:
        add(aid)
    for step in range(steps):
        for kind, aid in (events or {}).get(step, []):
            add(aid) if kind == "add" else trainer.retire([(reg[aid], Status.STOPPED_EARLY, None)])
        trainer.step()
    return trainer, init


def final_weights(trainer, aid):
    if aid in trainer.retired:
        return trainer.retired[aid].weights
    return trainer.model.adapter_weights(aid)


def differences_from_alone(base_model, sequences, trainer, init, aid, steps, configs=CONFIGS) -> list[str]:
    """Where the co-located adapter's losses or final weights differ from PEFT's alone on
    sequences[aid] beyond float64 rounding (empty: none)."""
    losses, weights = peft_alone(base_model, configs[aid], sequences[aid], init[aid], steps, PAD)
    return differences(aid, trainer.registry[aid].losses, final_weights(trainer, aid), losses, weights)


def assert_same_as_alone(base_model, sequences, trainer, init, aid, steps, configs=CONFIGS):
    assert differences_from_alone(base_model, sequences, trainer, init, aid, steps, configs) == []


def test_colocated_equals_alone_with_peft(base_model, sequences):
    trainer, init = colocated(base_model, sequences, ["a", "b", "c"])
    # c reaches max_steps=6 with micro_batch 1 and no accumulation: finished, weights kept.
    assert trainer.registry["c"].status == Status.FINISHED
    for aid in "abc":
        assert_same_as_alone(base_model, sequences, trainer, init, aid, MICRO_STEPS)
        assert trainer.registry[aid].losses[-1] < trainer.registry[aid].losses[0] * 1.5


def test_completion_only_colocated_equals_alone_with_peft(base_model, sequences):
    """Prompt tokens seen but not learned (alto.data's context-only tokens), co-located and packed:
    each adapter's trajectory is PEFT's alone with those positions' labels set to -100 by hand."""
    rng = random.Random(3)
    prompts = {aid: [rng.randrange(1, len(s) - 1) for s in sequences[aid]] for aid in CONFIGS}
    masked = {aid: [context(s[:k]) + s[k:] for s, k in zip(sequences[aid], prompts[aid])] for aid in CONFIGS}
    trainer, init = colocated(base_model, masked, list(CONFIGS))
    for aid in CONFIGS:
        assert not differences_from_alone(base_model, masked, trainer, init, aid, MICRO_STEPS)
    # the comparison sees the mask: PEFT trained on every token differs
    assert differences_from_alone(base_model, sequences, trainer, init, "a", MICRO_STEPS)


def test_a_shared_system_prompt_run_once_per_step_equals_alone_with_peft(base_model, sequences, monkeypatch):
    """Every sequence begins with the same context prefix (a chat template's system prompt): each
    step computes it once per adapter (alto.shared_prefixes), and each adapter's trajectory is
    still PEFT's alone over whole sequences (the norms in float64 math: see float64_norms)."""
    import alto.step

    rng = random.Random(4)
    system = context([rng.randrange(1, VOCAB) for _ in range(9)])
    prompted = {aid: [system + context(s[:1]) + s[1:] for s in sequences[aid]] for aid in CONFIGS}
    base = float64_norms(copy.deepcopy(base_model))
    shared = []
    monkeypatch.setattr(alto.step, "shared_prefix_lengths",
                        lambda *a, f=alto.step.shared_prefix_lengths: shared.append(f(*a)) or shared[-1])
    trainer, init = colocated(base, prompted, list(CONFIGS))
    assert shared == [[9, 9, 0]] * MICRO_STEPS  # the system prompt; c's micro-batch of 1 shares nothing
    for aid in CONFIGS:
        assert not differences_from_alone(base, prompted, trainer, init, aid, MICRO_STEPS)


class _LeakingOps:
    """torch.ops.alto with a planted bug: in every layer, the first adapter's last weight-gradient
    row also lands in the first row of the next adapter (an off-by-one in rank_indptr)."""

    def __getattr__(self, name):
        return getattr(torch.ops.alto, name)

    def lora_weight_grad(self, h, x, seg_indptr, rank_indptr, total_rank, scaling=None, out_dtype=None):
        out = torch.ops.alto.lora_weight_grad(h, x, seg_indptr, rank_indptr, total_rank, scaling, out_dtype)
        end = int(rank_indptr[1])
        if 0 < end < total_rank:
            out[end] += out[end - 1]
        return out


def _plant(bug, monkeypatch):
    import alto_ext.grouped_terms
    from alto.optim import MultiAdamW

    if bug == "scaling off by 1%":
        scaling = AdapterConfig.scaling.fget
        monkeypatch.setattr(AdapterConfig, "scaling", property(lambda self: 1.01 * scaling(self)))
    elif bug == "gradient leaks into the neighbour's rows":
        monkeypatch.setattr(alto_ext.grouped_terms, "ops", _LeakingOps())
    elif bug == "clip skipped":
        step = MultiAdamW.step
        monkeypatch.setattr(MultiAdamW, "step", lambda self, t, lrs, limits, norms: step(self, t, lrs, [None] * len(limits), norms))


@pytest.mark.parametrize("bug", ["scaling off by 1%", "gradient leaks into the neighbour's rows", "clip skipped"])
def test_the_peft_comparison_catches_planted_bugs(base_model, sequences, monkeypatch, bug):
    """The mutation check of this file's exactness claim: with each bug planted in ALTO (PEFT
    untouched), the comparison of test_colocated_equals_alone_with_peft fails."""
    _plant(bug, monkeypatch)
    trainer, init = colocated(base_model, sequences, ["a", "b", "c"])
    monkeypatch.undo()
    found = [d for aid in "abc" for d in differences_from_alone(base_model, sequences, trainer, init, aid, MICRO_STEPS)]
    assert found, f"planted bug not caught: {bug}"


@pytest.mark.parametrize("draw_bytes", [None, 1, 20_000])  # the default's rounds, a layer a round, a few layers a round
@pytest.mark.parametrize("bug", [None, "each layer drawn from a freshly seeded generator"])
def test_an_adapters_init_is_peft_s_from_its_own_seed_however_many_are_drawn_together(base_model, bug, draw_bytes,
                                                                                      monkeypatch):
    """Adapters added together are drawn in threads, one task per adapter and run of layers: each
    one's lora_A is PEFT's kaiming_uniform(a=sqrt(5)) layer after layer from a generator of its own
    seed (float32, as PEFT draws on the CPU), lora_B zero: the same bits as it alone, whichever
    adapters come with it and however the layers fall into rounds."""
    import math

    from alto import model as model_mod
    from alto.model import MultiLoraLinear

    if draw_bytes is not None:
        monkeypatch.setattr(model_mod, "DRAW_BYTES", draw_bytes)
    if bug:
        draw = MultiLoraLinear.initial_A
        monkeypatch.setattr(MultiLoraLinear, "initial_A",
                            lambda self, rank, gen, pinned: draw(self, rank, torch.Generator().manual_seed(gen.initial_seed()), pinned))
    model = MultiLoraModel(copy.deepcopy(base_model))
    model.add_adapters(CONFIGS)
    monkeypatch.undo()
    wrong = []
    for aid, config in CONFIGS.items():
        gen = torch.Generator().manual_seed(config.seed)
        for path, tensors in model.adapter_weights(aid).items():
            expected = torch.empty(config.rank, model.layers[path].base.in_features)
            torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=gen)
            if not torch.equal(tensors["lora_A"], expected.double()) or tensors["lora_B"].any():
                wrong.append((aid, path))
    assert bool(wrong) == bool(bug), wrong


def test_weights_given_to_a_joining_adapter_are_checked_before_anything_changes(base_model):
    model = MultiLoraModel(copy.deepcopy(base_model))
    model.add_adapters({"a": CONFIGS["a"]})
    good = model.adapter_weights("a")
    path = next(iter(good))
    wrong_rank = {p: {n: t[:-1] if p == path and n == "lora_B" else t for n, t in layer.items()} for p, layer in good.items()}
    for weights, message in [(wrong_rank, "lora_B is"), ({path: good[path]}, "weights given for")]:
        with pytest.raises(ValueError, match=message):
            model.add_adapters({"b": CONFIGS["a"]}, {"b": weights})
        assert list(model.configs) == ["a"] and all(layer.order in ([], ["a"]) for layer in model.layers.values())
    zeros = model.zero_weights(CONFIGS["a"])  # a probe's adapter: the layout the check asks for
    model.add_adapters({"z": CONFIGS["a"]}, {"z": zeros})
    assert all(t.count_nonzero() == 0 for layer in model.adapter_weights("z").values() for t in layer.values())
    assert {p: {n: t.shape for n, t in w.items()} for p, w in model.adapter_weights("z").items()} == \
        {p: {n: t.shape for n, t in w.items()} for p, w in good.items()}


def test_adding_and_removing_adapters_mid_run_leaves_others_unchanged(base_model, sequences):
    # c joins after 1 micro-step, while b (grad_accum=2) holds a half-accumulated gradient that the
    # re-pack must carry; b leaves after 4 micro-steps.
    trainer, init = colocated(base_model, sequences, ["a", "b"], {1: [("add", "c")], 4: [("remove", "b")]})
    assert trainer.registry["b"].status == Status.STOPPED_EARLY
    assert_same_as_alone(base_model, sequences, trainer, init, "a", MICRO_STEPS)
    assert_same_as_alone(base_model, sequences, trainer, init, "b", 4)
    assert_same_as_alone(base_model, sequences, trainer, init, "c", MICRO_STEPS - 1)


@pytest.mark.parametrize("bug", [None, "an adapter's rows counted as its neighbour's"])
def test_grad_norms_are_clip_grad_norm_s_of_each_adapter(base_model, sequences, monkeypatch, bug):
    """MultiLoraModel.grad_norms (each pack's row norms summed per adapter) = clip_grad_norm_'s norm of
    the adapter's own gradients, float64, for any subset of the adapters in any order, with a layer
    whose packs hold no gradient; a row given to the wrong adapter is caught."""
    model = MultiLoraModel(copy.deepcopy(base_model))
    model.add_adapters(CONFIGS)
    model.train()
    batches = {aid: sequences[aid][:2] for aid in CONFIGS}
    sums = colocated_losses(model, batches, PAD, torch.device("cpu"), training=True)
    (sums[0] / sums[1]).sum().backward()
    skipped = next(layer for layer in model.layers.values() if "c" in layer.order)
    for pack in skipped.packs():
        pack.grad = None  # a layer without gradients: its rows count nothing
    if bug:
        build = MultiLoraModel._grid_index

        def misplaced(packs, ids, device):
            index, width = build(packs, ids, device)
            index = index.clone()
            index[0][index[0] == 0] = 1  # the first adapter's rows counted as the next one's
            return index, width
        monkeypatch.setattr(MultiLoraModel, "_grid_index", staticmethod(misplaced))
    for ids in (list(CONFIGS), ["c", "a"]):
        ours = model.grad_norms(ids)
        reference = torch.stack([torch.nn.utils.get_total_norm([g for g in model.adapter_tensors(aid)[1] if g is not None])
                                 for aid in ids])
        assert ours.dtype == torch.float64
        assert torch.allclose(ours, reference, rtol=1e-12, atol=0) != bool(bug), (ids, ours, reference)


def test_packs_whose_storage_moves_mid_run_are_stepped_where_they_are_now(base_model, sequences):
    """The optimizer's views of the packs are kept between steps (MultiLoraLinear.split_packs): a
    pack whose data moves in place, as Module.to() moves a Parameter's, must be stepped in its new
    storage. Kept by the Parameter alone, the steps would go to the old copy and the adapter would
    stop learning (its losses and weights then differ from PEFT's)."""
    trainer, init = colocated(base_model, sequences, ["a", "b"], steps=2)
    for layer in trainer.model.layers.values():
        for pack in layer.packs():
            pack.data = pack.data.clone()  # what Module.to() does to a Parameter it converts
    for _ in range(MICRO_STEPS - 2):
        trainer.step()
    for aid in ("a", "b"):
        assert_same_as_alone(base_model, sequences, trainer, init, aid, MICRO_STEPS)


def test_admitting_and_retiring_together_is_bit_for_bit_one_at_a_time(base_model, sequences):
    """One re-pack per layer for many adapters (Trainer.admit / retire of a list) gives exactly the
    bits of adapter-by-adapter re-packs: every loss, the retired states (b mid-accumulation), the
    survivor's weights, moments and pending gradients."""
    def run(together: bool):
        model = MultiLoraModel(copy.deepcopy(base_model))
        reg = Registry()
        trainer = Trainer(model, reg, {a: DataStream(sequences[a]) for a in CONFIGS}, PAD)
        adapters = [reg.add(aid, CONFIGS[aid]) for aid in CONFIGS]
        for group in [adapters] if together else [[a] for a in adapters]:
            trainer.admit(group)
        for _ in range(3):
            trainer.step()
        # not in pack order; b goes back to the queue (its whole state kept), c ends (its weights kept)
        leaving = [(reg["c"], Status.STOPPED_EARLY, "test"), (reg["b"], Status.QUEUED, "test")]
        for group in [leaving] if together else [[x] for x in leaving]:
            trainer.retire(group)
        trainer.step()
        states = {aid: trainer.retired[aid] for aid in ("b", "c")}
        states["a"] = trainer.export_states(["a"])["a"]
        return {aid: reg[aid].losses for aid in CONFIGS}, states

    (losses, states), (losses_1, states_1) = run(True), run(False)
    assert losses == losses_1
    assert any(g.abs().sum() > 0 for g in states["b"].grads)  # b left mid-accumulation
    assert not states["c"].grads and not states["c"].optimizer["exp_avg"] and states["c"].optimizer["step"] == 3
    for aid in states:
        ours, theirs = states[aid].tensors(), states_1[aid].tensors()
        assert len(ours) == len(theirs) and all(t.device.type == "cpu" for t in ours)
        for x, y in zip(ours, theirs):
            assert x.dtype == y.dtype and torch.equal(x, y), aid


def test_lora_dropout_is_isolated_too(base_model, sequences):
    """With dropout, PEFT's global-RNG masks cannot be matched; ALTO's are drawn from each adapter's
    own generator, only in its layers and over its own length: alone or co-located (other targets,
    other padding), an adapter sees the same masks, losses and weights."""
    drop = {aid: CONFIGS[aid].__class__(**{**CONFIGS[aid].to_dict(), "dropout": 0.2}) for aid in CONFIGS}

    def run(ids):
        model = MultiLoraModel(copy.deepcopy(base_model))
        reg = Registry()
        trainer = Trainer(model, reg, {a: DataStream(sequences[a]) for a in ids}, PAD)
        for aid in ids:
            trainer.admit([reg.add(aid, drop[aid])])
        for _ in range(MICRO_STEPS):
            trainer.step()
        return reg, model

    alone, alone_model = run(["a"])
    together, together_model = run(["c", "a", "b"])
    # Equal up to float64 rounding of differently padded batches (a mask drawn differently moves
    # the losses by ~1e-4 relative after the first step).
    assert torch.allclose(torch.tensor(alone["a"].losses, dtype=torch.float64),
                          torch.tensor(together["a"].losses, dtype=torch.float64), rtol=EXACT_RTOL, atol=EXACT_ATOL)
    for path, tensors in alone_model.adapter_weights("a").items():
        for name, t in tensors.items():
            t2 = together_model.adapter_weights("a")[path][name]
            assert torch.allclose(t, t2, rtol=EXACT_RTOL, atol=EXACT_ATOL), (path, name)


def test_nan_loss_fails_only_that_adapter(base_model, sequences):
    trainer, _ = colocated(base_model, sequences, ["a", "b"], steps=2)
    # Poison b's weights: its loss becomes NaN; a must go on exactly as before.
    for w in trainer.model.adapter_tensors("b")[0]:
        w.fill_(float("nan"))
    before = trainer.model.adapter_weights("a")
    losses = trainer.step()
    assert trainer.registry["b"].status == Status.FAILED
    assert "nan" in trainer.registry["b"].failure
    assert "b" in trainer.retired  # its weights are kept, not dropped
    assert trainer.registry["a"].status == Status.RUNNING and torch.isfinite(torch.tensor(losses["a"]))
    after = trainer.model.adapter_weights("a")
    assert any(not torch.equal(before[p][n], after[p][n]) for p in before for n in before[p])
    trainer.step()
    assert trainer.registry["a"].micro_step == 4


def test_exploding_gradient_fails_only_that_adapter(base_model, sequences):
    trainer, _ = colocated(base_model, sequences, ["a", "b"], steps=1)
    # Every layer b targets gets an infinite gradient in b's rows only.
    layer = trainer.model.layers[trainer.model.target_layers(CONFIGS["b"])[0]]
    r0, r = layer.rows["b"]
    handle = layer.lora_A.register_hook(lambda g: torch.cat([g[:r0], torch.full_like(g[r0:r0 + r], float("inf")), g[r0 + r:]]))
    trainer.step()  # b accumulates (grad_accum=2): its optimizer step comes now
    handle.remove()
    assert trainer.registry["b"].status == Status.FAILED and "gradient norm is inf" in trainer.registry["b"].failure
    assert trainer.registry["a"].status == Status.RUNNING and trainer.registry["a"].step == 2
    weights = trainer.retired["b"].weights
    assert all(torch.isfinite(t).all() for layer in weights.values() for t in layer.values())


def tiny_family_model(family: str, **extra):
    """A float64 random model of a transformers family (config class: <family>Config, or
    <family>TextConfig for the multimodal families' text decoders), tiny and seeded."""
    torch.manual_seed(0)
    config_class = getattr(transformers, f"{family}TextConfig", None) or getattr(transformers, f"{family}Config")
    cfg = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                       eos_token_id=1, bos_token_id=2, **extra)
    return getattr(transformers, f"{family}ForCausalLM")(cfg).double().eval()


# Phi-3's projections are fused: the same adapters over its names (qkv_proj = q, k and v; gate_up_proj = gate and up).
PHI3_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
              "up_proj": "gate_up_proj"}
FAMILIES = {  # family -> (config fields besides the tiny ones, packed steps)
    "Qwen2": ({}, True),  # biased q/k/v projections
    "Mistral": ({}, True),
    "Phi3": ({}, True),  # fused qkv_proj and gate_up_proj
    "Gemma": ({"head_dim": 24}, True),  # heads wider than hidden / heads, embeddings scaled, tied head
    "Gemma2": ({"head_dim": 24}, False),  # soft-capped attention and logits (padded steps: packed ones refuse it)
    "Gemma3": ({"head_dim": 24, "sliding_window": 8}, True),  # sliding-window layers, q/k norms
    "Qwen3": ({"head_dim": 24}, True),  # q/k norms
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_decoder_families_match_peft(family, sequences):
    """Each model family of alto.families (and the Llama-like ones it covers by default) trains
    co-located exactly as PEFT trains each adapter alone (float64)."""
    extra, packed = FAMILIES[family]
    base = tiny_family_model(family, **extra)
    configs = {aid: dataclasses.replace(c, target_modules=tuple(dict.fromkeys(
        PHI3_NAMES.get(m, m) if family == "Phi3" else m for m in c.target_modules))) for aid, c in CONFIGS.items()}
    trainer, init = colocated(base, sequences, ["a", "b"], steps=3, configs=configs, packed=packed)
    assert set(trainer.model.family.names) == {n.rsplit(".", 1)[-1] for n in trainer.model.layers}
    for aid in "ab":
        assert_same_as_alone(base, sequences, trainer, init, aid, 3, configs)


class OwnForward(torch.nn.Linear):
    """A base layer with a forward of its own (as quantized layers have): counted, same math."""
    calls = 0

    def forward(self, x):
        OwnForward.calls += 1
        return super().forward(x)


def test_a_base_layer_with_its_own_forward_gets_the_same_training(base_model, sequences):
    """The base-layer seam: a Linear subclass runs base(x) plus the adapters' delta instead of the
    fused path, with the same trajectories (float64: equal to rounding)."""
    own = copy.deepcopy(base_model)
    for layer in own.model.layers:
        for name in ("q_proj", "down_proj"):
            parent = layer.self_attn if name == "q_proj" else layer.mlp
            plain = getattr(parent, name)
            swapped = OwnForward(plain.in_features, plain.out_features, bias=plain.bias is not None,
                                 dtype=plain.weight.dtype)
            swapped.load_state_dict(plain.state_dict())
            setattr(parent, name, swapped)
    OwnForward.calls = 0
    fused, _ = colocated(base_model, sequences, ["a", "b", "c"], steps=3)
    seam, _ = colocated(own, sequences, ["a", "b", "c"], steps=3)
    assert OwnForward.calls > 0
    assert not seam.model.layers["model.layers.0.self_attn.q_proj"].fused
    for aid in "abc":
        assert torch.allclose(torch.tensor(seam.registry[aid].losses, dtype=torch.float64),
                              torch.tensor(fused.registry[aid].losses, dtype=torch.float64),
                              rtol=EXACT_RTOL, atol=EXACT_ATOL), aid
        for path, tensors in final_weights(fused, aid).items():
            for name, t in tensors.items():
                assert torch.allclose(final_weights(seam, aid)[path][name], t, rtol=EXACT_RTOL, atol=EXACT_ATOL)


def test_a_quantized_base_layer_is_refused_with_a_clear_error(base_model):
    model = copy.deepcopy(base_model)
    q = model.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(torch.zeros(q.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="only dense float and NF4 .* base layers are supported"):
        MultiLoraModel(model)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="rank=0"):
        AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="lr=-0.1"):
        AdapterConfig(lr=-0.1)
    with pytest.raises(ValueError, match="target_modules='q proj'"):
        AdapterConfig(target_modules=("q proj",))


def test_saved_adapter_loads_in_peft_with_the_same_logits(base_model, sequences, tmp_path):
    from alto.export import save_peft_adapter
    from alto.model import plan_for

    trainer, _ = colocated(base_model, sequences, ["a", "b"], steps=3)
    ids, mask, _ = pad_batch(sequences["a"][:3], PAD)
    for aid in "ab":
        out = save_peft_adapter(trainer.model.adapter_weights(aid), trainer.registry[aid], tmp_path / aid)
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "alto_adapter.json"]
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(out)).eval()
        with torch.no_grad():
            theirs = loaded(input_ids=ids, attention_mask=mask).logits
            plan = plan_for(trainer.model, [aid], [[ids.shape[1]] * 3], ids.shape[1], torch.device("cpu"))
            ours = trainer.model.eval()(plan, input_ids=ids, attention_mask=mask)
        trainer.model.train()
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), (aid, (ours - theirs).abs().max())
        # and the adapter really changed the model
        with torch.no_grad():
            plain = base_model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(plain, theirs, atol=1e-4)


@pytest.mark.cuda
def test_colocated_training_on_cuda_tracks_the_cpu_run(base_model, sequences):
    """The same run on the GPU (bf16 autocast, CUTLASS kernels) follows the float32 CPU run."""
    cpu, _ = colocated(base_model, sequences, ["a", "b", "c"], dtype=torch.float32)
    gpu, _ = colocated(base_model, sequences, ["a", "b", "c"], device="cuda", dtype=torch.float32)
    for aid in "abc":
        ours, ref_losses = torch.tensor(gpu.registry[aid].losses), torch.tensor(cpu.registry[aid].losses)
        assert gpu.registry[aid].status == cpu.registry[aid].status
        assert torch.allclose(ours, ref_losses, rtol=2e-2), (aid, ours, ref_losses)
