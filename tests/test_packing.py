"""Packed (padding-free) co-located steps do the same math as padded ones: every adapter's loss and
every adapter's gradient agree, on tiny Llama, Qwen2 (biased q/k/v) and Mistral (sliding window)
models, with sequences of 2 tokens, an adapter whose batch is one long sequence, and LoRA dropout
(the masks are drawn as for the adapter's padded batch alone). The comparison is shown to fail
when attention or a next-token target crosses a sequence boundary."""
import copy
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import alto.attention  # noqa: E402
import alto.step  # noqa: E402
from alto.model import MultiLoraModel, StepPlan  # noqa: E402
from alto.registry import AdapterConfig  # noqa: E402
from alto.step import colocated_losses  # noqa: E402

VOCAB, PAD = 80, 0
ADAPTERS = {  # id -> (config, sequence lengths of its batch)
    "short": (AdapterConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=1), [2, 7, 13, 2]),
    "long": (AdapterConfig(rank=8, alpha=16, seed=2, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj")), [45]),
    "dropout": (AdapterConfig(rank=2, alpha=4, dropout=0.3, seed=3, target_modules=("up_proj", "down_proj")), [5, 2, 9]),
}
FAMILIES = ["Llama", "Qwen2", "Mistral"]


def tiny(family: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, **extra)
    return getattr(transformers, f"{family}ForCausalLM")(cfg).eval()


def step(base: torch.nn.Module, batches, packed: bool, device: torch.device):
    """Per-adapter loss sums and token counts, and every adapter's gradients, of one training step."""
    model = MultiLoraModel(copy.deepcopy(base).to(device))
    gen = torch.Generator().manual_seed(5)
    for aid, (cfg, _) in ADAPTERS.items():
        model.add_adapters({aid: cfg})
        for layer in model.layers.values():  # B = 0 at init would hide the LoRA path's gradients
            if aid in layer.rows:
                B = layer.tensors(aid)[0][1]
                B.copy_(0.1 * torch.randn(B.shape, generator=gen))
    model.train()
    sums = colocated_losses(model, batches, PAD, device, training=True, packed=packed)
    (sums[0] / sums[1]).sum().backward()
    grads = {aid: [g.clone() for g in model.adapter_tensors(aid)[1]] for aid in ADAPTERS}
    return sums.detach(), grads


def batches_of(seed: int):
    rng = random.Random(seed)
    return {aid: [[rng.randrange(1, VOCAB) for _ in range(n)] for n in lengths] for aid, (_, lengths) in ADAPTERS.items()}


def differences(base, device, tol) -> list[str]:
    batches = batches_of(random.randrange(10**6))
    (packed_sums, packed_grads), (padded_sums, padded_grads) = (step(base, batches, p, device) for p in (True, False))
    out = []
    if not torch.allclose(packed_sums, padded_sums, **tol):
        out.append(f"losses {packed_sums.tolist()} vs {padded_sums.tolist()}")
    for aid in ADAPTERS:
        for i, (a, b) in enumerate(zip(packed_grads[aid], padded_grads[aid])):
            if not torch.allclose(a, b, **tol):
                out.append(f"{aid} gradient {i}: max difference {(a - b).abs().max():.3g}")
    return out


FP32 = {"rtol": 1e-4, "atol": 1e-6}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_step_equals_padded_step(family):
    base = tiny(family, **({"sliding_window": 16} if family == "Mistral" else {}))  # the long sequence exceeds it
    assert differences(base, torch.device("cpu"), FP32) == []


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_step_equals_padded_step_on_cuda(family):
    """On the GPU the packed step runs torch's FlashAttention varlen kernel in bf16 (autocast), the
    padded one SDPA with a mask: equal to bf16 rounding."""
    base = tiny(family, **({"sliding_window": 16} if family == "Mistral" else {}))
    assert differences(base, torch.device("cuda"), {"rtol": 3e-2, "atol": 3e-3}) == []


def _one_attention_over_everything(q, k, v, cu_q, cu_k, scale, window):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale,
        enable_gqa=True).transpose(0, 1)


def _targets_crossing_boundaries(sequences, pad_id, packed, device, offsets=None, padding=None):
    inputs, labels, row_len = STEP_INPUTS(sequences, pad_id, packed, device, offsets, padding)
    return inputs, (inputs["input_ids"] if packed else labels), row_len  # each last token predicts the next sequence


STEP_INPUTS = alto.step.step_inputs


# (Positions that do not restart are no bug for rotary models: q.k depends on position differences only.)
@pytest.mark.parametrize("bug", ["attention crosses sequences", "a target crosses a sequence boundary"])
def test_the_packing_comparison_catches_planted_bugs(bug, monkeypatch):
    if bug == "attention crosses sequences":
        monkeypatch.setattr(alto.attention, "_per_sequence", _one_attention_over_everything)
    else:
        monkeypatch.setattr(alto.step, "step_inputs", _targets_crossing_boundaries)
    assert differences(tiny("Llama"), torch.device("cpu"), FP32) != []


def test_varlen_attention_refuses_what_it_cannot_do():
    q = torch.zeros(2, 4, 3, 8)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        alto.attention.varlen_attention(None, q, q, q, None)
    packed = {"cu_seq_lens_q": torch.tensor([0, 3]), "max_length_q": 3}
    with pytest.raises(ValueError, match="soft-capping.*packing: false"):  # Gemma2's attention logits
        alto.attention.varlen_attention(None, q[:1], q[:1], q[:1], None, softcap=50.0, **packed)


@pytest.mark.parametrize("max_positions", [1, 40, 10_000])
def test_held_out_losses_padded_equal_packed_and_chunks_hold_their_positions(max_positions, monkeypatch):
    """Evaluation runs as the sweep's steps run (packing false: padded rows, for models packed steps
    cannot run): both give each adapter's mean held-out loss over all its sequences (float64, against
    one forward of everything), and no chunk's forward holds more token positions than asked
    (padding counted) unless it is one sequence."""
    import alto.evaluation

    model = MultiLoraModel(tiny("Llama").double())
    for aid, (cfg, _) in ADAPTERS.items():
        model.add_adapters({aid: cfg})
    batches = batches_of(11)
    model.eval()
    with torch.no_grad():
        whole = colocated_losses(model, batches, PAD, torch.device("cpu"), training=False)
    expected = (whole[0] / whole[1]).tolist()
    original = alto.evaluation.colocated_losses
    for packed in (True, False):
        chunks = []  # (token positions, sequences) of each forward

        def counted(m, chunk, *args, **kw):
            lengths = [len(s) for b in chunk.values() for s in b]
            chunks.append((alto.step.step_positions(lengths, kw["packed"]), len(lengths)))
            return original(m, chunk, *args, **kw)
        monkeypatch.setattr(alto.evaluation, "colocated_losses", counted)
        [got] = alto.evaluation.held_out_means(model, batches, PAD, torch.device("cpu"), max_positions, packed=packed)
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), rtol=1e-12, atol=1e-12), packed
        assert all(positions <= max_positions or n == 1 for positions, n in chunks), chunks
        assert sum(n for _, n in chunks) == sum(map(len, batches.values()))


def test_a_packed_dropout_mask_keeps_the_cells_of_real_tokens_found_once_per_step():
    """An adapter's packed tokens sit row by row in its [sequences, longest] mask grid: the cells
    are listed on the host (a boolean index of the mask on a GPU waits for it) and reused by every
    layer of the step."""
    plan = StepPlan(["a"], [[3, 1, 2]], None, [1.0], [0.5], [torch.Generator()], torch.device("cpu"))
    cells = plan.token_cells([3, 1, 2], torch.device("cpu"))
    assert cells.tolist() == [0, 1, 2, 3, 6, 7]  # rows of 3: [0 1 2], [3], [6 7]
    assert plan.token_cells([3, 1, 2], torch.device("cpu")) is cells
