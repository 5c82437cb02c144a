"""Stacked projections in a co-located model (alto.projection_stacks): a step through the stacks
computes what it computes with every projection alone (float64: the same sums in another order),
for each family that has input groups; the stacks run where they may and nowhere else (LoRA
dropout, a stack too wide, inference tensors, a member called on another input); outputs kept for a
member that is never called do not outlive the forward."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import alto_ext  # noqa: E402
from alto import projection_stacks  # noqa: E402
from alto.model import MultiLoraModel, plan_for  # noqa: E402
from alto.registry import AdapterConfig  # noqa: E402
from alto.step import colocated_losses, step_inputs  # noqa: E402
from conftest import tiny_model  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {  # ranks and targets differ: k has one adapter (a1); gate (a1, a2) and up (a0, a1) two, not the same
    "a0": AdapterConfig(rank=4, alpha=8, seed=0, target_modules=("q_proj", "v_proj", "up_proj")),
    "a1": AdapterConfig(rank=12, alpha=6, seed=1, target_modules=ALL),
    "a2": AdapterConfig(rank=3, alpha=3, seed=2, target_modules=("q_proj", "v_proj", "o_proj", "gate_proj")),
}


def counted_stacks(monkeypatch) -> list[int]:
    calls = []
    original = alto_ext.multi_lora_linear_stack

    def counted(x, weights, *args):
        calls.append(len(weights))
        return original(x, weights, *args)

    monkeypatch.setattr(alto_ext, "multi_lora_linear_stack", counted)
    return calls


def step(family: str, configs: dict, monkeypatch, stacked: bool, training: bool = True, device: str = "cpu"):
    """Per-adapter losses and adapter gradients of one packed step (float64 on the CPU, a bf16 base
    under autocast on the GPU), and the stacks' sizes."""
    monkeypatch.setattr(projection_stacks, "ENABLED", stacked)
    calls = counted_stacks(monkeypatch)
    model = MultiLoraModel(tiny_model(family, torch.float64 if device == "cpu" else torch.bfloat16).to(device))
    model.add_adapters(configs)
    for layer in model.layers.values():  # B = 0 at init: make the adapters matter
        torch.nn.init.normal_(layer.lora_B.data, std=0.3)
    model.train(training)
    gen = torch.Generator().manual_seed(5)
    batches = {aid: [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (9, 14)] for aid in configs}
    sums = colocated_losses(model, batches, 0, torch.device(device), training=training)
    losses = sums[0] / sums[1]
    losses.sum().backward()
    grads = torch.cat([g.flatten() for aid in configs for g in model.adapter_tensors(aid)[1]])
    monkeypatch.undo()
    return losses.detach(), grads, calls


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Qwen3", "Gemma"])
def test_a_step_through_the_stacks_computes_what_the_projections_alone_do(family, monkeypatch):
    loss0, grad0, calls0 = step(family, CONFIGS, monkeypatch, stacked=False)
    loss1, grad1, calls1 = step(family, CONFIGS, monkeypatch, stacked=True)
    assert calls0 == [] and calls1 == [3, 2] * 2  # q, k, v and gate, up in each of the 2 layers
    assert torch.allclose(loss1, loss0, rtol=1e-12, atol=0)
    assert (grad1 - grad0).norm() <= 1e-12 * grad0.norm()


@pytest.mark.cuda
def test_on_cuda_a_bf16_step_through_the_stacks_matches_the_projections_alone(monkeypatch):
    loss0, grad0, _ = step("Llama", CONFIGS, monkeypatch, stacked=False, device="cuda")
    loss1, grad1, calls = step("Llama", CONFIGS, monkeypatch, stacked=True, device="cuda")
    assert calls == [3, 2] * 2
    assert torch.allclose(loss1, loss0, rtol=1e-2), (loss0, loss1)
    assert (grad1 - grad0).norm() <= 0.03 * grad0.norm()


@pytest.mark.parametrize("one_adapter_gemms", [True, False])
def test_one_adapter_stacks_past_max_width(monkeypatch, one_adapter_gemms):
    """MAX_WIDTH bounds the grouped stack's padded blocks; a single adapter's stack (alto_ext.one_adapter: its rows
    unpadded) has none, so it stacks at any width, and computes what its projections alone do. Its grouped stack
    (ALTO_ONE_ADAPTER_GEMMS=0) keeps the limit."""
    from alto_ext import one_adapter

    one = {"a1": CONFIGS["a1"]}  # rank 12 in every projection: 3 x 16 columns over q, k, v
    loss0, grad0, _ = step("Llama", one, monkeypatch, stacked=False)
    monkeypatch.setattr(projection_stacks, "MAX_WIDTH", 16)
    monkeypatch.setattr(one_adapter, "ENABLED", one_adapter_gemms)
    loss1, grad1, calls = step("Llama", one, monkeypatch, stacked=True)
    assert calls == ([3, 2] * 2 if one_adapter_gemms else [])
    assert torch.allclose(loss1, loss0, rtol=1e-12, atol=0)
    assert (grad1 - grad0).norm() <= 1e-12 * grad0.norm()


def test_lora_dropout_keeps_the_projections_alone_in_training_only(monkeypatch):
    """PEFT draws a dropout mask per projection: a stack cannot share one x; held-out passes can."""
    configs = {**CONFIGS, "a2": AdapterConfig(rank=3, alpha=3, seed=2, dropout=0.1, target_modules=("q_proj", "v_proj"))}
    assert step("Llama", configs, monkeypatch, stacked=True)[2] == [2] * 2  # gate/up: a2 is not there
    assert step("Llama", configs, monkeypatch, stacked=True, training=False)[2] == [3, 2] * 2


def test_a_member_called_on_another_input_runs_alone(monkeypatch):
    """The kept output is for the first member's input: given another tensor, or the same one changed
    in place (forward only: autograd refuses a backward through a changed saved input), k_proj
    computes its own output, and every gradient is what the members alone give (the dropped
    output's is zero)."""
    model = MultiLoraModel(tiny_model("Llama", torch.float64))
    model.add_adapters({"a": AdapterConfig(rank=4, seed=0, target_modules=("q_proj", "k_proj"))})
    attn = model.model.model.layers[0].self_attn
    for layer in (attn.q_proj, attn.k_proj):
        torch.nn.init.normal_(layer.lora_B.data, std=0.3)
    packs = [attn.q_proj.lora_A, attn.q_proj.lora_B, attn.k_proj.lora_A, attn.k_proj.lora_B]
    x0 = torch.randn(1, 6, 64, dtype=torch.float64)
    model.context.plan = plan_for(model, ["a"], [[6]], None, torch.device("cpu"))

    def run(changed: bool):
        x = x0.clone()
        if changed:
            with torch.no_grad():
                q = attn.q_proj(x)
                return [q, attn.k_proj(x.add_(1))]
        q = attn.q_proj(x)
        y = attn.k_proj(x + 1)
        (q.square().sum() + y.square().sum()).backward()
        out = [q.detach(), y.detach()] + [p.grad.clone() for p in packs]
        for p in packs:
            p.grad = None
        return out

    try:
        monkeypatch.setattr(projection_stacks, "ENABLED", False)
        alone = run(changed=False)
        monkeypatch.undo()
        for changed in (False, True):
            calls = counted_stacks(monkeypatch)
            got = run(changed)
            assert calls == [2] and not model.context.kept
            for g, want in zip(got, alone):
                assert torch.allclose(g, want, rtol=1e-12, atol=0)
            monkeypatch.undo()
    finally:
        model.context.plan = None


def packed_step(model: MultiLoraModel):
    """CONFIGS' adapters put in the model (B random: they matter), and the plan and inputs of a
    packed step of one 5-token sequence for each."""
    model.add_adapters(CONFIGS)
    for layer in model.layers.values():
        torch.nn.init.normal_(layer.lora_B.data, std=0.3)
    seqs = [torch.randint(3, 64, (5,)).tolist() for _ in CONFIGS]
    inputs, _, _ = step_inputs(seqs, 0, packed=True, device=torch.device("cpu"))
    return plan_for(model, list(CONFIGS), [[5]] * len(CONFIGS), None, torch.device("cpu")), inputs


def test_a_stack_wider_than_max_width_runs_its_projections_alone(monkeypatch):
    """One rank-128 adapter among rank-8 ones: q, k, v would stack 3 x 128 columns (over 256, every
    adapter padded to 128), gate and up 2 x 128 (stacked)."""
    configs = {"small": AdapterConfig(rank=8, seed=0, target_modules=ALL),
               "large": AdapterConfig(rank=128, alpha=8, seed=1, target_modules=ALL)}
    assert step("Llama", configs, monkeypatch, stacked=True)[2] == [2] * 2


def test_inference_tensors_run_the_projections_alone(monkeypatch):
    """An inference tensor has no version counter to check a kept output against."""
    calls = counted_stacks(monkeypatch)
    model = MultiLoraModel(tiny_model("Llama", torch.float64))
    plan, inputs = packed_step(model)
    with torch.inference_mode():
        stacked = model(plan, **inputs)
    monkeypatch.setattr(projection_stacks, "ENABLED", False)
    with torch.no_grad():
        alone = model(plan, **inputs)
    assert calls == [] and torch.allclose(stacked, alone, rtol=1e-12)


def test_outputs_kept_for_a_member_never_called_end_with_the_forward(monkeypatch):
    """A forward that fails after q_proj stacked q, k and v (k_proj raises before its own call) leaves
    nothing kept; the next forward is whole and equal to the projections alone."""
    model = MultiLoraModel(tiny_model("Llama", torch.float64))
    plan, inputs = packed_step(model)
    k_proj = model.model.model.layers[1].self_attn.k_proj

    def fail(module, args):
        assert k_proj in model.context.kept  # q_proj's call kept k's output
        raise RuntimeError("planted")

    handle = k_proj.register_forward_pre_hook(fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="planted"):
        model(plan, **inputs)
    handle.remove()
    assert not model.context.kept
    with torch.no_grad():
        stacked = model(plan, **inputs)
        monkeypatch.setattr(projection_stacks, "ENABLED", False)
        alone = model(plan, **inputs)
    assert torch.allclose(stacked, alone, rtol=1e-12)


@pytest.mark.parametrize("stacks, bug", [("on", None), ("off", None), ("too wide", None),
                                         ("on", "the stacks' segments not sent")])
def test_send_plan_builds_all_a_step_reads(monkeypatch, stacks, bug):
    """MultiLoraModel.send_plan builds the plan's device data that a step's forward and backward read (a padded
    step is captured as a CUDA graph after it, where no host data may be sent: alto.step_graphs): the step
    builds no segments of its own, and send_plan none the step does not read (no stacked segments where each
    projection runs alone: stacks off, or wider than MAX_WIDTH). A send_plan without the stacks' is caught."""
    stacked = stacks == "on"
    monkeypatch.setattr(projection_stacks, "ENABLED", stacks != "off")
    if stacks == "too wide":
        monkeypatch.setattr(projection_stacks, "MAX_WIDTH", 8)
    if bug:
        monkeypatch.setattr(projection_stacks.ProjectionStack, "send", lambda self, plan: None)
    calls = counted_stacks(monkeypatch)
    model = MultiLoraModel(tiny_model("Llama", torch.float64))
    plan, inputs = packed_step(model)
    model.send_plan(plan)
    sent = (set(plan._segments), set(plan._stacks), plan._token_indptr)
    model(plan, **inputs).sum().backward()
    assert len(calls) == (4 if stacked else 0)  # q, k, v and gate, up in each of the 2 layers
    built = (set(plan._segments), set(plan._stacks), plan._token_indptr)
    assert (built != sent) if bug else (built == sent and bool(sent[1]) == stacked)
