"""Fused base layers (alto.fused_layers): which modules of each family are fused and with which kind,
checked against what each transformers class computes (on the CPU bitwise, through an emulation of
liger's casting modes); off CUDA or outside a co-located forward nothing changes; on the GPU, liger's
kernels are what runs and a fused model (a co-located bf16 step included) matches the eager one."""
import contextlib
import copy
import gc
import pickle
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alto import fused_layers  # noqa: E402
from alto.families import Llama  # noqa: E402
from alto.fused_layers import NORM_KINDS, NormKind  # noqa: E402
from alto.model import MultiLoraModel  # noqa: E402
from alto.registry import AdapterConfig  # noqa: E402
from alto.step import colocated_losses  # noqa: E402
from conftest import tiny_model  # noqa: E402

FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Gemma3", "Phi3")


def tiny(family: str, dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model of the family with random norm weights (Gemma's start at zero)."""
    model = tiny_model(family, dtype, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.5, 0.3)
    return model.eval()


def emulated_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: NormKind) -> torch.Tensor:
    """What liger's RMSNorm kernel computes in a casting mode, in torch ops: the inverse RMS in fp32;
    llama: the normalized input cast back before the weight (+ offset) multiplies it in its dtype;
    gemma: everything in fp32, cast back at the end."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if kind.casting_mode == "llama":
        return normed.to(x.dtype) * (weight + kind.offset)
    assert kind.casting_mode == "gemma"
    return (normed * (weight.float() + kind.offset)).to(x.dtype)


def norms(model):
    return [(p, m) for p, m in model.named_modules() if type(m).__name__ in NORM_KINDS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_rms_norm_kind_computes_what_its_class_does(family, dtype):
    model = tiny(family, dtype)
    assert norms(model), f"{family}: no RMSNorm class named in NORM_KINDS"
    for path, norm in norms(model):
        x = torch.randn(3, 5, norm.weight.shape[0], dtype=dtype) * 3
        eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
        kind = NORM_KINDS[type(norm).__name__]
        assert torch.equal(emulated_norm(x, norm.weight, eps, kind), norm(x)), f"{family} {path}"


@pytest.mark.parametrize("family,wrong", [("Llama", fused_layers._GEMMA_NORM), ("Gemma", fused_layers._LLAMA_NORM)])
def test_the_norm_check_fails_on_the_wrong_kind(family, wrong):
    """The planted bug: a family given the other kind is told apart (bf16, where the casts differ)."""
    model = tiny(family, torch.bfloat16)
    _, norm = norms(model)[0]
    x = torch.randn(3, 5, norm.weight.shape[0], dtype=torch.bfloat16) * 3
    eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
    assert not torch.equal(emulated_norm(x, norm.weight, eps, wrong), norm(x))


# per family: fused norms per decoder layer (+ the final one), whether its MLP is SwiGLU, whether RoPE is wrapped
EXPECTED = {"Llama": (2, True, True), "Mistral": (2, True, True), "Qwen2": (2, True, True), "Qwen3": (4, True, True),
            "Gemma": (2, False, True), "Gemma2": (4, False, True), "Gemma3": (6, False, True), "Phi3": (2, False, False)}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_multi_lora_model_fuses_each_familys_norms_swiglu_and_rope(family):
    model = tiny(family)
    MultiLoraModel(model)
    per_layer, swiglu, rope = EXPECTED[family]
    fused = [p for p, m in model.named_modules() if isinstance(m, (fused_layers._FusedNorm, fused_layers._FusedMLP))]
    mlps = [p for p in fused if p.endswith(".mlp")]
    assert len(fused) - len(mlps) == 2 * per_layer + 1
    assert len(mlps) == (2 if swiglu else 0)
    modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    assert hasattr(modeling.apply_rotary_pos_emb, "alto_original") == rope


@pytest.mark.parametrize("family", ["Llama", "Qwen3", "Gemma3"])
def test_off_cuda_a_fused_model_computes_exactly_what_it_did(family):
    """On the CPU, inside active() too, the fused modules and the wrapped rotary function run the
    model's own code: logits and input gradients are bitwise those of an untouched twin."""
    plain, fused = tiny(family), tiny(family)
    fused_layers.install(fused)
    ids = torch.randint(3, 64, (2, 9))
    outs = []
    for model in (plain, fused):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        with fused_layers.active():
            logits = model(inputs_embeds=embeds).logits
        logits.square().sum().backward()
        outs.append((logits, embeds.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


class Emulated:
    """liger's three functions as torch emulations (what each kernel computes), recording their calls."""

    def __init__(self, rope):
        self.calls: list[tuple] = []
        emulated = self

        class Norm:
            @staticmethod
            def apply(x, weight, eps, offset, casting_mode, in_place):
                emulated.calls.append(("norm", weight.shape[0], eps, NormKind(offset, casting_mode, in_place)))
                return emulated_norm(x, weight, eps, NormKind(offset, casting_mode, in_place))

        class SiLUMul:
            @staticmethod
            def apply(gate, up):
                emulated.calls.append(("silu_mul",))
                return torch.nn.functional.silu(gate) * up

        class Rope:
            @staticmethod
            def apply(q, k, cos, sin):
                emulated.calls.append(("rope",))
                return rope(q, k, cos, sin)

        self.functions = (Norm, SiLUMul, Rope)


@pytest.mark.parametrize("family", ["Llama", "Qwen3", "Gemma2"])
def test_inside_active_each_fused_module_calls_liger_with_its_arguments(family, monkeypatch):
    """The dispatch itself, on the CPU: liger's functions replaced by torch emulations, every module is
    fused here. Each norm passes its weight, eps and kind (Gemma's offset 1, not in place), the MLP
    gate's and up's outputs in that order, the rotary function q, k, cos and sin: the logits are
    bitwise those of the untouched twin (a swapped argument or a wrong eps would change them)."""
    plain, fused = tiny(family), tiny(family)
    fused_layers.install(fused)
    modeling = __import__(type(fused).__module__, fromlist=["apply_rotary_pos_emb"])
    liger = Emulated(modeling.apply_rotary_pos_emb.alto_original)
    monkeypatch.setattr(fused_layers, "_liger", lambda: liger.functions)
    monkeypatch.setattr(fused_layers, "_fusable", lambda *tensors: fused_layers._active.get())
    ids = torch.randint(3, 64, (2, 9))
    with fused_layers.active():
        got = fused(ids).logits
    assert torch.equal(got, plain(ids).logits)
    per_layer, swiglu, _ = EXPECTED[family]
    layers = fused.config.num_hidden_layers
    norms_called = [c for c in liger.calls if c[0] == "norm"]
    assert len(norms_called) == 2 * per_layer + 1
    # Gemma 2 and 3 read a norm's output gradient twice (sandwich norms): never overwritten in place
    kind = NormKind(1.0, "gemma", False) if family.startswith("Gemma") else NormKind(0.0, "llama", True)
    assert {c[3] for c in norms_called} == {kind} and {c[2] for c in norms_called} == {fused.config.rms_norm_eps}
    assert liger.calls.count(("silu_mul",)) == (layers if swiglu else 0) and liger.calls.count(("rope",)) == layers


def test_a_pickle_or_copy_of_a_fused_model_holds_the_plain_classes():
    model = tiny("Llama")
    fused_layers.install(model)
    ids = torch.randint(3, 64, (1, 7))
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert not any(isinstance(m, (fused_layers._FusedNorm, fused_layers._FusedMLP)) for m in other.modules())
        assert type(other.model.norm) is transformers.models.llama.modeling_llama.LlamaRMSNorm
        assert torch.equal(other(ids).logits, model(ids).logits)


def recompute_step(model: MultiLoraModel, batches: dict, device: torch.device, products: list
                   ) -> tuple[list[bool], list[torch.Tensor]]:
    """A training step: which MLP products (weak references, appended as they are made) are still
    alive after its forward, and copies of every adapter gradient after its backward."""
    sums = colocated_losses(model, batches, 0, device, training=True)
    gc.collect()
    alive = [ref() is not None for ref in products]
    (sums[0] / sums[1].clamp_min(1)).sum().backward()
    return alive, [g.clone() for aid in model.configs for g in model.adapter_tensors(aid)[1] if g is not None]


@pytest.mark.parametrize("dtype,dropout", [(torch.float64, 0.0), (torch.float32, 0.0), (torch.float64, 0.1)])
def test_the_mlps_product_is_computed_again_in_backward_not_kept_and_bitwise_the_same(dtype, dropout, monkeypatch):
    """A co-located step on the CPU, every projection targeted: after the forward nothing holds an
    MLP's product (its memory is free until the backward), and every adapter gradient is bitwise
    that of a twin that keeps the products (recomputed() doing nothing). Without LoRA dropout the
    backward computes each layer's product once more (down_proj's LoRA reads it twice over, as its
    input and as its LoRA input: one recomputation serves both) where the twin keeps it; with an
    adapter's dropout, down_proj keeps the dropped input, and nothing needs the product again."""
    original = fused_layers.recomputed
    every = Llama.names  # down_proj's LoRA keeps its input (a plain frozen projection keeps none)
    configs = {"a": AdapterConfig(rank=4, alpha=8, seed=0, target_modules=every),
               "b": AdapterConfig(rank=8, alpha=8, seed=1, dropout=dropout, target_modules=every)}
    batches = {aid: [torch.randint(3, 64, (n,)).tolist() for n in (11, 6)] for aid in configs}
    results = []
    for recompute in (True, False):
        products, recomputations = [], []

        def watched(tensor, compute):
            products.append(weakref.ref(tensor))

            def counted():
                recomputations.append(torch.is_grad_enabled())
                return compute()
            return original(tensor, counted) if recompute else contextlib.nullcontext()

        monkeypatch.setattr(fused_layers, "recomputed", watched)
        model = MultiLoraModel(tiny("Llama", dtype))
        model.add_adapters(configs)
        for layer in model.layers.values():  # B = 0 at init: make the adapters matter
            torch.nn.init.normal_(layer.lora_B.data, std=0.05, generator=torch.Generator().manual_seed(3))
        alive, grads = recompute_step(model, batches, torch.device("cpu"), products)
        results.append(grads)
        layers = model.model.config.num_hidden_layers
        kept = not recompute and not dropout
        assert len(products) == layers and alive == [kept] * layers
        assert recomputations == ([False] * layers if recompute and not dropout else [])
    assert len(results[0]) == len(results[1]) > 0
    assert all(torch.equal(g, h) for g, h in zip(*results))


# ---- on the GPU: liger's kernels run, and match the eager model --------------------------------
def count_liger_calls(monkeypatch) -> dict[str, int]:
    """Counts each liger function's apply (wrapped in place, so the fused modules' calls go through it)."""
    calls = {}
    for fn in fused_layers._liger():
        original = fn.apply
        calls[fn.__name__] = 0

        def counted(*args, _name=fn.__name__, _original=original):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(fn, "apply", counted)
    return calls


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_on_cuda_the_fused_layers_run_liger_and_match_the_eager_model(family, monkeypatch):
    plain, fused = tiny(family, torch.bfloat16).cuda(), tiny(family, torch.bfloat16).cuda()
    fused_layers.install(fused)
    calls = count_liger_calls(monkeypatch)
    ids = torch.randint(3, 64, (2, 33), device="cuda")
    outs = []
    for model in (plain, fused):  # the plain twin outside active(): the wrapped rotary function runs eager
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        with fused_layers.active() if model is fused else contextlib.nullcontext():
            logits = model(inputs_embeds=embeds).logits.float()
        logits.square().mean().backward()
        outs.append((logits, embeds.grad.float()))
    per_layer, swiglu, rope = EXPECTED[family]
    layers = fused.config.num_hidden_layers
    # each product twice: in the forward, and again in the backward (down_proj, trainable here, reads its input)
    assert calls == {"LigerRMSNormFunction": 2 * per_layer + 1, "LigerSiLUMulFunction": 2 * layers if swiglu else 0,
                     "LigerRopeFunction": layers if rope else 0}
    (l0, g0), (l1, g1) = outs
    assert (l1 - l0).abs().max() <= 0.02 * l0.abs().max(), family
    assert (g1 - g0).norm() <= 0.02 * g0.norm(), family


@pytest.mark.cuda
def test_a_colocated_bf16_step_with_fused_layers_matches_the_eager_one(monkeypatch):
    """A packed step of three adapters over a bf16 Llama: per-adapter losses and adapter gradients
    with the fused layers on and off (ALTO_FUSED_LAYERS=0) agree to bf16 rounding."""
    torch.manual_seed(1)
    configs = {f"a{i}": AdapterConfig(rank=r, alpha=2 * r, seed=i) for i, r in enumerate((4, 8, 16))}
    batches = {aid: [torch.randint(3, 64, (n,)).tolist() for n in (17, 30)] for aid in configs}
    results = []
    for enabled in (False, True):
        monkeypatch.setattr(fused_layers, "ENABLED", enabled)
        model = MultiLoraModel(tiny("Llama", torch.bfloat16).cuda())
        model.add_adapters(configs)
        for layer in model.layers.values():  # B = 0 at init: make the adapters matter
            torch.nn.init.normal_(layer.lora_B.data, std=0.05)
        calls = count_liger_calls(monkeypatch)
        sums = colocated_losses(model, batches, 0, torch.device("cuda"), training=True)
        (sums[0] / sums[1]).sum().backward()
        assert (calls["LigerRMSNormFunction"] > 0) == enabled
        grads = torch.cat([g.flatten() for aid in configs for g in model.adapter_tensors(aid)[1] if g is not None])
        results.append((sums[0] / sums[1], grads))
    (loss0, grad0), (loss1, grad1) = results
    assert torch.allclose(loss1, loss0, rtol=1e-2), (loss0, loss1)
    assert (grad1 - grad0).norm() <= 0.03 * grad0.norm()


@pytest.mark.cuda
def test_on_cuda_the_recomputed_product_gives_the_same_bits_for_less_memory(monkeypatch):
    """liger's product computed again in the backward (4 layers, every projection targeted): each
    recomputation bitwise the forward's product (liger's kernel is deterministic), the adapters'
    gradients those of a twin that keeps the products (to the run-to-run differences of a CUDA
    step: flash attention's backward adds its query gradients atomically), and the step's peak
    lower by at least one layer's product (the twin keeps three more where the first MLP backward
    runs)."""
    original = fused_layers.recomputed
    every = Llama.names
    configs = {f"a{i}": AdapterConfig(rank=8, alpha=16, seed=i, target_modules=every) for i in range(2)}
    tokens, intermediate = 2048, 2048
    batches = {aid: [torch.randint(3, 64, (tokens // 2,)).tolist()] for aid in configs}
    peaks, results, pairs = [], [], []
    for recompute in (True, False):
        def watched(tensor, compute):
            if not recompute:
                return contextlib.nullcontext()
            kept = tensor.detach().cpu()  # on the host: the GPU's peak stays the step's own
            return original(tensor, lambda: pairs.append((kept, compute())) or pairs[-1][1])

        monkeypatch.setattr(fused_layers, "recomputed", watched)
        model = MultiLoraModel(tiny_model("Llama", torch.bfloat16, intermediate_size=intermediate,
                                          num_hidden_layers=4).cuda())
        model.add_adapters(configs)
        for layer in model.layers.values():  # B = 0 at init: make the adapters matter
            torch.nn.init.normal_(layer.lora_B.data, std=0.05)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _, grads = recompute_step(model, batches, torch.device("cuda"), [])
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        results.append(torch.cat([g.float().flatten() for g in grads]))
        del model
    assert len(pairs) == 4 and all(torch.equal(forward, again.cpu()) for forward, again in pairs)
    assert (results[0] - results[1]).norm() <= 1e-2 * results[1].norm()
    assert peaks[1] - peaks[0] >= tokens * intermediate * 2, peaks
