"""A 4-bit (NF4, torchao) frozen base: the layer against a float64 reference on its dequantized
weight, co-located training against HF PEFT trained alone over the same NF4 base, the exported
adapters on the dequantized base in PEFT, the bytes it holds, and `alto tune` with base.quantize.

In float64 the NF4 layer's output is F.linear on the dequantized weight plus the adapters' delta:
the same math as the reference up to rounding (EXACT_RTOL); the reference on the original,
unquantized weight must NOT pass (the check would miss a base that was never quantized)."""
import copy
import random

import pytest
import torch

pytest.importorskip("torchao")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import alto_ext  # noqa: E402
from alto.base import held_bytes, is_nf4, model_bytes, quantize_nf4  # noqa: E402
from alto.model import MultiLoraLinear, MultiLoraModel, _Context, plan_for  # noqa: E402
from alto.registry import AdapterConfig, Registry  # noqa: E402
from alto.step import pad_batch  # noqa: E402
from alto.train import DataStream, Trainer  # noqa: E402
from conftest import EXACT_ATOL, EXACT_RTOL, differences, peft_alone  # noqa: E402

VOCAB, PAD = 96, 0
CONFIGS = {
    "a": AdapterConfig(rank=4, alpha=8, lr=1e-3, micro_batch_size=2, target_modules=("q_proj", "v_proj", "down_proj"),
                       seed=1, max_steps=50),
    "b": AdapterConfig(rank=7, alpha=14, lr=5e-4, micro_batch_size=3, grad_accum=2, use_rslora=True, seed=2,
                       target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                       max_steps=50),
}
STEPS = 4


def nf4_linear(out_features: int, in_features: int, dtype=torch.float64) -> tuple[torch.nn.Linear, torch.Tensor]:
    """A Linear whose weight is NF4 (quantized from a random one), and that original weight."""
    lin = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
    original = lin.weight.detach().clone()
    holder = torch.nn.Module()
    holder.q_proj = lin
    quantize_nf4(holder, torch.device("cpu"))
    return holder.q_proj, original


@pytest.mark.parametrize("shape", [(80, 48), (64, 200), (192, 8)])
def test_nf4_layer_forward_backward_equals_a_float64_reference_on_the_dequantized_weight(shape):
    out_features, in_features = shape
    base, original = nf4_linear(out_features, in_features)
    assert is_nf4(base.weight)
    dequantized = base.weight.get_original_weight().double()
    ranks, counts, scaling = [3, 1, 5], [7, 0, 4], [0.5, 2.0, 1.25]
    layer = MultiLoraLinear(base, _Context(), torch.float64)
    assert not layer.fused  # the NF4 weight runs its own forward
    layer.add_adapters([(f"g{i}", {"lora_A": layer.initial_A(r, torch.Generator().manual_seed(i))}) for i, r in enumerate(ranks)])
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide the expand
    A, B = layer.lora_A, layer.lora_B
    x = torch.randn(sum(counts), in_features, dtype=torch.float64, requires_grad=True)
    segments = alto_ext.Segments.build(counts, ranks, scaling, "cpu", torch.float64)
    y = base(x) + alto_ext.lora_delta(x, A, B, segments)
    dy = torch.randn_like(y)
    y.backward(dy)

    def reference(weight):
        xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (x, A, B))
        parts, row, r0 = [], 0, 0
        for n, r, s in zip(counts, ranks, scaling):
            xs = xr[row : row + n]
            parts.append(xs @ weight.T + s * (xs @ Ar[r0 : r0 + r].T) @ Br[r0 : r0 + r])
            row, r0 = row + n, r0 + r
        yr = torch.cat(parts)
        yr.backward(dy)
        return yr, xr.grad, Ar.grad, Br.grad

    ours = (y, x.grad, A.grad, B.grad)
    for got, ref in zip(ours, reference(dequantized)):
        assert torch.allclose(got, ref, rtol=EXACT_RTOL, atol=EXACT_ATOL), (got - ref).abs().max()
    # The planted bug: a base that was never quantized gives another output, and the check sees it.
    assert not torch.allclose(ours[0], reference(original)[0], rtol=EXACT_RTOL, atol=EXACT_ATOL)


@pytest.fixture(scope="module")
def nf4_base():
    torch.manual_seed(0)
    # Every projection a whole number of NF4 scaler blocks (64 x 256 weights): torchao's clone (deepcopy)
    # re-quantizes with the default blocks.
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   pad_token_id=PAD)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    quantize_nf4(model, torch.device("cpu"))
    return model


@pytest.fixture(scope="module")
def sequences():
    rng = random.Random(11)
    return {aid: [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(4, 15))] for _ in range(10)] for aid in CONFIGS}


def train_together(base, sequences):
    model = MultiLoraModel(copy.deepcopy(base))
    reg = Registry()
    trainer = Trainer(model, reg, {a: DataStream(sequences[a]) for a in CONFIGS}, PAD)
    trainer.admit([reg.add(aid, cfg) for aid, cfg in CONFIGS.items()])
    init = {aid: model.adapter_weights(aid) for aid in CONFIGS}
    for _ in range(STEPS):
        trainer.step()
    return trainer, init


def test_colocated_over_an_nf4_base_equals_peft_alone_over_the_same_base(nf4_base, sequences):
    """QLoRA isolation: two adapters trained together over the NF4 base match each trained alone
    with HF PEFT over the same NF4 layers (PEFT's LoRA wraps the torchao Linear and runs its forward)."""
    trainer, init = train_together(nf4_base, sequences)
    assert all(is_nf4(layer.base.weight) for layer in trainer.model.layers.values())
    for aid in CONFIGS:
        losses, weights = peft_alone(nf4_base, CONFIGS[aid], sequences[aid], init[aid], STEPS, PAD)
        ours = trainer.model.adapter_weights(aid)
        assert differences(aid, trainer.registry[aid].losses, ours, losses, weights) == []


def test_adapters_trained_over_nf4_load_in_peft_on_the_dequantized_base(nf4_base, sequences, tmp_path):
    from alto.export import save_peft_adapter

    trainer, _ = train_together(nf4_base, sequences)
    dequantized = copy.deepcopy(nf4_base)
    for module in dequantized.modules():
        if isinstance(module, torch.nn.Linear) and is_nf4(module.weight):
            module.weight = torch.nn.Parameter(module.weight.get_original_weight(), requires_grad=False)
    assert not any(is_nf4(p) for p in dequantized.parameters())
    ids, mask, _ = pad_batch(sequences["a"][:3], PAD)
    for aid in CONFIGS:
        out = save_peft_adapter(trainer.model.adapter_weights(aid), trainer.registry[aid], tmp_path / aid)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(dequantized), str(out)).eval()
        with torch.no_grad():
            theirs = loaded(input_ids=ids, attention_mask=mask).logits
            plan = plan_for(trainer.model, [aid], [[ids.shape[1]] * 3], ids.shape[1], torch.device("cpu"))
            ours = trainer.model.eval()(plan, input_ids=ids, attention_mask=mask)
            plain = dequantized(input_ids=ids, attention_mask=mask).logits
        trainer.model.train()
        # the export holds float32 weights (PEFT's default): equal to float32 rounding
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), (aid, (ours - theirs).abs().max())
        assert not torch.allclose(plain, theirs, atol=1e-6)  # the adapter changed the model


def test_an_nf4_weight_holds_about_an_eighth_of_float32():
    base, original = nf4_linear(256, 512, torch.float32)
    # 4 bits per weight, an 8-bit absmax per 64 weights, a float32 scale per 256 absmaxes: 0.516 bytes
    assert held_bytes(base.weight) / original.numel() == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-4)
    assert held_bytes(original) == 4 * original.numel()


def test_nf4_needs_whole_blocks_and_says_which_layer():
    holder = torch.nn.Module()
    holder.v_proj = torch.nn.Linear(10, 7, bias=False)
    with pytest.raises(ValueError, match=r"multiple of 64 values; v_proj is \(7, 10\)"):
        quantize_nf4(holder, torch.device("cpu"))


def test_alto_tune_trains_over_an_nf4_base(tmp_path, sweep_yaml):
    """base: {quantize: nf4} through `alto tune`: every projection 4-bit, adapters trained and exported."""
    from alto.sweep import parse_sweep
    from alto.sweep_run import SweepRun
    from alto.tune import tune

    path = sweep_yaml(base={"quantize": "nf4"})
    run = SweepRun(parse_sweep(path.read_text()), tmp_path / "inspect")
    assert all(is_nf4(layer.base.weight) for layer in run.model.layers.values())
    assert tune(str(path), None, log=lambda *_: None) == 0
    board = (tmp_path / "run" / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 5 and all(",finished," in row for row in board[1:])
    assert (tmp_path / "run" / "adapters" / "rank4-lr0p003" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_the_memory_estimate_matches_the_bytes_a_loaded_base_holds(quantize):
    """alto.sched.memory.base_bytes (what planning reads before any model is loaded) against the
    bytes a real base holds after loading, float32 and NF4."""
    from alto.sched.catalog import ModelShape
    from alto.sched.memory import base_bytes

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    if quantize == "nf4":
        quantize_nf4(model, torch.device("cpu"))
    held = model_bytes(model)
    assert base_bytes(ModelShape.from_hf_config(cfg), weight_bytes=4, quantize=quantize) == pytest.approx(held, rel=1e-3)
