"""Co-located passes that compute each adapter's shared context prefix once (alto.shared_prefixes) give
every adapter the held-out losses (SFT) and DPO sums of one forward over the whole sequences, and in
training the same losses and every adapter's gradients: float64, 1e-12, on Llama, Qwen2 (biased
q/k/v), Qwen3 (q/k norms) and Mistral (a sliding window shorter than the sequences), with prefixes of
different lengths per adapter, an adapter whose sequences share none, one with a single sequence, own
parts of two tokens, and an adapter with LoRA dropout (which trains unshared, its masks drawn as
before). Dynamic rotary scaling shares too (the pass's longest position is the whole sequences').
Planted bugs (the own tokens' positions not continuing the prefix, the prefix's keys left out, a
trained token shared, no gradient back through the prefix's keys and values) fail the comparison.
"""
import math
import os
import random

import pytest
import torch

pytest.importorskip("transformers")

import alto.evaluation  # noqa: E402
import alto.shared_prefixes  # noqa: E402
import alto.step  # noqa: E402
from alto.data import context  # noqa: E402
from alto.model import MultiLoraModel  # noqa: E402
from alto.objectives import DPO  # noqa: E402
from alto.registry import AdapterConfig  # noqa: E402
from alto.shared_prefixes import shared_lengths  # noqa: E402
from alto.step import colocated_losses  # noqa: E402
from conftest import float64_norms, tiny_model  # noqa: E402

PAD = 0
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {
    "a": AdapterConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=1, beta=0.1),
    "b": AdapterConfig(rank=8, alpha=8, target_modules=ALL, seed=2, beta=0.5, loss_type="ipo"),
    "c": AdapterConfig(rank=2, alpha=4, target_modules=("k_proj", "down_proj"), seed=3, beta=0.2),
    "d": AdapterConfig(rank=3, alpha=3, target_modules=("v_proj", "up_proj"), seed=4, beta=0.3),
    "e": AdapterConfig(rank=2, alpha=2, target_modules=("q_proj", "v_proj", "down_proj"), seed=5, beta=0.1,
                       dropout=0.3),
}


def word(rng: random.Random) -> int:
    return rng.randrange(3, 64)


def held_out_batches(rng: random.Random, pairs: bool = False) -> dict[str, list[list[int]]]:
    """a: a 20-token context prefix (a system prompt), then a context question and a trained answer;
    b: a 6-token one, and one sequence without a question (so 5 are shared, and its own tokens are
    the prefix's last and its answer); c: no common prefix; d: one sequence; e: an 8-token prefix
    (LoRA dropout: shared in held-out passes only). pairs: each prompt twice, with a chosen and a
    rejected answer (DPO's samples)."""
    def sequences(prefix: list[int], questions: list[int]) -> list[list[int]]:
        out = []
        for n in questions:
            question = context([word(rng) for _ in range(n)])
            for _ in range(2 if pairs else 1):
                out.append(prefix + question + [word(rng) for _ in range(rng.randint(1, 5))])
        return out

    return {"a": sequences(context([word(rng) for _ in range(20)]), [rng.randint(1, 6) for _ in range(4)]),
            "b": sequences(context([word(rng) for _ in range(6)]), [2, 0, 3]),
            "c": sequences([], [rng.randint(2, 5) for _ in range(2)]),
            "d": sequences(context([word(rng) for _ in range(9)]), [3]),
            "e": sequences(context([word(rng) for _ in range(8)]), [1, 2, 4])}


def model_of(family: str, dtype=torch.float64, device: str = "cpu") -> MultiLoraModel:
    extra = {"sliding_window": 12} if family == "Mistral" else {}
    base = tiny_model(family, dtype, **extra).to(device)
    model = MultiLoraModel(float64_norms(base) if dtype == torch.float64 else base)
    gen = torch.Generator().manual_seed(7)
    for aid, cfg in CONFIGS.items():
        model.add_adapters({aid: cfg})
        for layer in model.layers.values():  # B = 0 at init would hide the adapters' part
            if aid in layer.rows:
                B = layer.tensors(aid)[0][1]
                B.copy_(0.3 * torch.randn(B.shape, generator=gen, dtype=B.dtype))  # (copied to B's device)
    return model.eval()


def sums(model: MultiLoraModel, batches, shared: bool, monkeypatch, objective=None, device: str = "cpu") -> torch.Tensor:
    monkeypatch.setattr(alto.shared_prefixes, "MIN_SAVED_SHARE", 0.1 if shared else math.inf)
    kw = {} if objective is None else {"objective": objective}
    with torch.no_grad():
        return colocated_losses(model, batches, PAD, torch.device(device), training=False, **kw)


def forwards_counted(monkeypatch) -> list[int]:
    calls = []
    original = MultiLoraModel.forward

    def counted(self, plan, *args, **kw):
        calls.append(sum(map(sum, plan.lengths)))
        return original(self, plan, *args, **kw)
    monkeypatch.setattr(MultiLoraModel, "forward", counted)
    return calls


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Qwen3", "Mistral"])
def test_shared_prefixes_give_the_losses_of_whole_sequences(family, monkeypatch):
    model, rng = model_of(family), random.Random(family)
    batches = held_out_batches(rng)
    assert shared_lengths(batches) == [20, 5, 0, 0, 8]
    calls = forwards_counted(monkeypatch)
    whole = sums(model, batches, False, monkeypatch)
    assert len(calls) == 1
    got = sums(model, batches, True, monkeypatch)
    assert len(calls) == 2 and calls[1] == calls[0] - 3 * 20 - 2 * 5 - 2 * 8  # each prefix once, in one pass
    assert torch.equal(got[1], whole[1])  # the same target tokens
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)


def test_dpo_pairs_sharing_their_prompts_give_the_sums_of_whole_sequences(monkeypatch):
    model = model_of("Llama")
    batches = held_out_batches(random.Random(3), pairs=True)
    got, whole = (sums(model, batches, s, monkeypatch, DPO()) for s in (True, False))
    assert got.shape[0] == 4  # loss, pairs, reward accuracy and margin sums
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)


def training_step(model: MultiLoraModel, batches, shared: bool, monkeypatch, objective=None):
    """A training step's loss sums and every adapter's gradients."""
    monkeypatch.setattr(alto.shared_prefixes, "MIN_SAVED_SHARE", 0.1 if shared else math.inf)
    model.train()
    for aid in CONFIGS:
        for g in model.adapter_tensors(aid)[1]:
            if g is not None:
                g.zero_()
    kw = {} if objective is None else {"objective": objective}
    sums = colocated_losses(model, batches, PAD, torch.device("cpu"), training=True, **kw)
    (sums[0] / sums[1]).sum().backward()
    return sums.detach(), {aid: [g.clone() for g in model.adapter_tensors(aid)[1]] for aid in CONFIGS}


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Qwen3", "Mistral"])
def test_a_training_step_with_shared_prefixes_gives_the_losses_and_gradients_of_whole_sequences(family, monkeypatch):
    batches = held_out_batches(random.Random(family + "train"))
    model = model_of(family)
    assert alto.step.shared_prefix_lengths(model, batches, True, True) == [20, 5, 0, 0, 0]  # e: dropout
    calls = forwards_counted(monkeypatch)
    (whole, whole_grads), (got, grads) = (training_step(model_of(family), batches, s, monkeypatch) for s in (False, True))
    assert len(calls) == 2  # one forward whole, then one sharing
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)
    for aid in CONFIGS:
        assert len(grads[aid]) == len(whole_grads[aid]) and any(g.abs().sum() > 0 for g in grads[aid])
        for g, w in zip(grads[aid], whole_grads[aid]):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_a_dpo_training_step_with_shared_prompts_gives_the_gradients_of_whole_sequences(monkeypatch):
    batches = held_out_batches(random.Random(4), pairs=True)
    whole, whole_grads = training_step(model_of("Llama"), batches, False, monkeypatch, DPO())
    calls = forwards_counted(monkeypatch)
    got, grads = training_step(model_of("Llama"), batches, True, monkeypatch, DPO())
    assert len(calls) == 2  # the base's references (whole sequences), then the adapters' pass sharing
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)
    for aid in CONFIGS:
        assert any(g.abs().sum() > 0 for g in grads[aid])
        for g, w in zip(grads[aid], whole_grads[aid]):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def detach_borrowed_keys(monkeypatch) -> None:
    """A planted bug: the keys and values a sequence reads from its adapter's first sequence's rows
    (its shared prefix) carry no gradient back there."""
    original = alto.shared_prefixes.SharedPrefixes.keys_and_values

    def detached(self, layer, k, v):
        borrowed = torch.tensor([j > 0 and p < n for n, lengths in zip(self.shared, self.lengths)
                                 for j, length in enumerate(lengths) for p in range(length)], device=k.device)
        (wk, wv), (dk, dv) = original(self, layer, k, v), original(self, layer, k.detach(), v.detach())
        return torch.where(borrowed[:, None, None], dk, wk), torch.where(borrowed[:, None, None], dv, wv)
    monkeypatch.setattr(alto.shared_prefixes.SharedPrefixes, "keys_and_values", detached)


def test_without_a_gradient_through_the_prefix_the_training_comparison_fails(monkeypatch):
    batches = held_out_batches(random.Random(6))
    whole = training_step(model_of("Llama"), batches, False, monkeypatch)[1]
    detach_borrowed_keys(monkeypatch)
    got = training_step(model_of("Llama"), batches, True, monkeypatch)[1]
    assert any(not torch.allclose(g, w, rtol=1e-6, atol=1e-9) for g, w in zip(got["a"], whole["a"]))


def test_held_out_means_count_one_forward_per_chunk_for_a_sharded_base(monkeypatch):
    """A sharded base's ranks agree on their forwards before any: a chunk with shared prefixes is
    one forward (the idle passes make up the difference to the busiest rank)."""
    model = model_of("Llama")
    batches = held_out_batches(random.Random(5))
    heard, calls = [], forwards_counted(monkeypatch)
    idle = []
    monkeypatch.setattr(alto.evaluation, "idle_pass", lambda *a, **k: idle.append(1))

    def lockstep(n: int) -> int:
        heard.append(n)
        return n + 1  # another rank needs one more
    means = alto.evaluation.held_out_means(model, batches, PAD, torch.device("cpu"), 10_000, lockstep)
    assert heard == [1] and len(calls) == 1 and idle == [1]
    monkeypatch.setattr(alto.shared_prefixes, "MIN_SAVED_SHARE", math.inf)
    torch.testing.assert_close(torch.tensor(means), torch.tensor(alto.evaluation.held_out_means(
        model, batches, PAD, torch.device("cpu"), 10_000)), rtol=1e-12, atol=1e-12)


def test_what_is_shared():
    c = context
    # positions whose targets are context: the trained token's predecessor is the sequences' own
    assert shared_lengths({"a": [c([5, 6, 7]) + [8], c([5, 6, 7]) + [9]]}) == [2]
    assert shared_lengths({"a": [c([5, 6]) + [7, 8, 9], c([5, 6]) + [7, 8, 4]]}) == [1]
    # the token after the shared part may differ (it is context in each)
    assert shared_lengths({"a": [c([5, 6, 7, 8]) + [1], c([5, 6, 7, 9]) + [1]]}) == [3]
    assert shared_lengths({"a": [c([5, 6]) + [1], c([5, 6, 7]) + [1]]}) == [1]
    # every sequence keeps an own token
    assert shared_lengths({"a": [c([5, 6, 7]), c([5, 6, 7, 8])]}) == [2]
    # one sequence, nothing in common, or too little saved: one forward
    assert shared_lengths({"a": [c([5, 6, 7]) + [1]]}) is None
    assert shared_lengths({"a": [c([5, 6]) + [1], c([4, 6]) + [1]]}) is None
    assert shared_lengths({"a": [c([5]) + [1] * 20, c([5]) + [2] * 20]}) is None


def test_passes_that_share_nothing():
    """Not packed, or the base's own dropout in training: one forward over whole sequences."""
    model, batches = model_of("Llama"), held_out_batches(random.Random(2))
    lengths = alto.step.shared_prefix_lengths
    assert lengths(model, batches, True, True) == [20, 5, 0, 0, 0] and lengths(model, batches, False, True)[4] == 8
    assert lengths(model, batches, False, False) is None
    base = tiny_model("Llama", torch.float64)
    base.model.layers[0].extra = torch.nn.Dropout(0.1)  # the base's own dropout: masks per sequence
    model = MultiLoraModel(base)
    model.add_adapters(dict(CONFIGS))
    assert lengths(model, batches, True, True) is None and lengths(model, batches, False, True) is not None


def test_alto_shared_prefixes_0_runs_every_sequence_whole(monkeypatch):
    batches = held_out_batches(random.Random(2))
    assert shared_lengths(batches) is not None
    monkeypatch.setattr(alto.shared_prefixes, "ENABLED", False)  # what ALTO_SHARED_PREFIXES=0 sets at import
    assert shared_lengths(batches) is None


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}])
def test_scaled_rotary_angles_share_exactly(rope, monkeypatch):
    """Dynamic NTK scaling reads the pass's longest position, which sharing leaves as the whole
    sequences' (max_position_embeddings 16 here: the angles rescale inside these sequences)."""
    def model_with(rope_parameters: dict) -> MultiLoraModel:
        base = tiny_model("Llama", torch.float64, max_position_embeddings=16,
                          rope_parameters={"rope_theta": 10000.0, **rope_parameters})
        model = MultiLoraModel(float64_norms(base))
        for aid, cfg in CONFIGS.items():
            model.add_adapters({aid: cfg})
        return model.eval()
    batches = held_out_batches(random.Random(8))
    assert max(len(s) for b in batches.values() for s in b) > 16
    assert alto.step.shared_prefix_lengths(model_with(rope), batches, False, True) == [20, 5, 0, 0, 8]
    got, whole = (sums(model_with(rope), batches, s, monkeypatch) for s in (True, False))
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(whole, sums(model_with({"rope_type": "default"}), batches, False, monkeypatch))


def test_what_is_shared_read_from_heads_equals_whole_sequences_read():
    """shared_lengths reads only the sequences' heads (host time per step): on random sequences
    (lists and tensors, prefixes around its first read's size) the same as reading them whole."""
    def whole(seqs):
        tokens = [list(map(int, s)) for s in seqs]
        common, n = os.path.commonprefix(tokens), 0
        while n < min(len(common), min(map(len, tokens)) - 1) and all(s[n + 1] < 0 for s in tokens):
            n += 1
        return n

    rng = random.Random(0)
    for _ in range(2000):
        size = rng.choice([1, 2, 3, 5, 63, 64, 65, 200])
        prefix = [-rng.randrange(1, 5) for _ in range(rng.randrange(0, size + 1))]
        seqs = [(prefix + [rng.choice([-1, -2, 3, 4]) for _ in range(rng.randrange(1, size + 3))])
                for _ in range(rng.randrange(2, 4))]
        seqs = [torch.tensor(s) if rng.random() < 0.5 else s for s in seqs]
        assert alto.shared_prefixes._shared(seqs) == whole(seqs), seqs


def _common_prefixes(batches, alone=()):
    """A planted bug: the whole common prefix shared, trained tokens and all."""
    return [min(len(os.path.commonprefix(seqs)), min(map(len, seqs)) - 1) if len(seqs) > 1 else 0
            for seqs in batches.values()]


@pytest.mark.parametrize("bug", ["positions restart", "prefix keys left out", "a trained token shared"])
def test_the_comparison_catches_planted_bugs(bug, monkeypatch):
    model = model_of("Llama")
    batches = held_out_batches(random.Random(9))
    whole = sums(model, batches, False, monkeypatch)
    if bug == "positions restart":
        original = alto.step.step_inputs
        monkeypatch.setattr(alto.step, "step_inputs", lambda *a: original(*a[:4]))
    elif bug == "prefix keys left out":  # each sequence reads only the keys of its own rows
        original_init = alto.shared_prefixes.SharedPrefixes.__post_init__

        def no_prefix_keys(self):
            original_init(self)
            runs = [n - (s if j else 0) for s, lens in zip(self.shared, self.lengths) for j, n in enumerate(lens)]
            self.key_index = torch.arange(sum(runs))
            self.cu_keys = torch.nn.functional.pad(torch.tensor(runs).cumsum(0), (1, 0)).to(torch.int32)
        monkeypatch.setattr(alto.shared_prefixes.SharedPrefixes, "__post_init__", no_prefix_keys)
    else:  # a's sequences: two trained tokens, the same in each, after the system prompt
        batches["a"] = [s[:20] + [7, 8] + s[20:] for s in batches["a"]]
        whole = sums(model, batches, False, monkeypatch)
        monkeypatch.setattr(alto.step, "shared_lengths", _common_prefixes)
    got = sums(model, batches, True, monkeypatch)
    assert not torch.allclose(got, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_on_cuda_bf16_shared_prefixes_match_whole_sequences(monkeypatch):
    """On the GPU a bf16 base's held-out pass runs torch's FlashAttention varlen kernel (every
    sequence's keys whole, its queries its own tokens, the causal mask aligned at the end): equal
    to bf16 rounding."""
    model = model_of("Llama", torch.bfloat16, "cuda")
    batches = held_out_batches(random.Random(11))
    got, whole = (sums(model, batches, s, monkeypatch, device="cuda") for s in (True, False))
    torch.testing.assert_close(got[0] / got[1], whole[0] / whole[1], rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("planted_bug", [False, True])
def test_on_cuda_a_bf16_training_step_with_shared_prefixes_matches_whole_sequences(planted_bug, monkeypatch):
    """A training step on the GPU (bf16 autocast, FlashAttention varlen forward and backward, fewer
    queries than keys where a sequence runs from its own tokens): losses equal to bf16 rounding, each gradient within 2% of
    the whole sequences' in norm (bf16 GEMMs of other shapes round single near-zero elements
    differently: an element-wise bound read one of 256 at 2.0e-5 against 1.8e-5 on the H200).
    Planted bug: the prefix's keys and values read by the other sequences without gradients must
    fail that bound for the sharing adapter a."""
    batches = held_out_batches(random.Random(12))

    def step(shared: bool):
        model = model_of("Llama", torch.float32, "cuda")
        monkeypatch.setattr(alto.shared_prefixes, "MIN_SAVED_SHARE", 0.1 if shared else math.inf)
        model.train()
        sums = colocated_losses(model, batches, PAD, torch.device("cuda"), training=True)
        (sums[0] / sums[1]).sum().backward()
        return sums.detach(), {aid: [g.clone() for g in model.adapter_tensors(aid)[1]] for aid in CONFIGS}
    whole, whole_grads = step(False)
    if planted_bug:
        detach_borrowed_keys(monkeypatch)
    got, grads = step(True)
    torch.testing.assert_close(got[0] / got[1], whole[0] / whole[1], rtol=2e-2, atol=2e-2)
    errors = {aid: max(float((g - w).norm() / w.norm()) for g, w in zip(grads[aid], whole_grads[aid]))
              for aid in CONFIGS}
    if planted_bug:
        assert errors["a"] > 0.1, errors
    else:
        assert max(errors.values()) < 2e-2, errors


KEYS, QUERIES = [9, 30, 17, 64], [9, 12, 1, 40]  # per sequence: keys whole, queries its last ones


def attention_inputs(dtype, device: str):
    gen = torch.Generator().manual_seed(3)
    cu_k, cu_q = (torch.nn.functional.pad(torch.tensor(n).cumsum(0), (1, 0)).to(torch.int32).to(device)
                  for n in (KEYS, QUERIES))
    q = torch.randn(sum(QUERIES), 8, 32, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(sum(KEYS), 2, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    return *(t.to(device, dtype) for t in (q, k, v)), cu_q, cu_k


def aligned_at_the_start(q, k, v, cu_q, cu_k):
    """A planted bug: each sequence's queries aligned at the start of its keys (SDPA's is_causal
    with fewer queries than keys)."""
    out = []
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        out.append(torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1])), is_causal=True, enable_gqa=True).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("window", [None, 5, 40])
def test_fewer_queries_than_keys_give_the_whole_sequences_last_rows(window):
    """The CPU path (SDPA per sequence, an explicit mask where a sequence runs only its last
    queries): each sequence's output rows equal the last rows of the same attention over all its
    queries, float64, windowed or not, with fewer key/value heads; aligned at the start they differ."""
    q, k, v, cu_q, cu_k = attention_inputs(torch.float64, "cpu")
    gen = torch.Generator().manual_seed(4)
    whole_q = torch.randn(sum(KEYS), *q.shape[1:], generator=gen, dtype=torch.float64)
    rows = torch.cat([torch.arange(k1 - n, k1) for k1, n in zip(cu_k[1:].tolist(), QUERIES)])
    whole_q[rows] = q
    whole = alto.attention._per_sequence(whole_q, k, v, cu_k, cu_k, None, window)[rows]
    got = alto.attention._per_sequence(q, k, v, cu_q, cu_k, None, window)
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)
    if window is None:
        assert not torch.allclose(aligned_at_the_start(q, k, v, cu_q, cu_k), whole, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("window", [None, 5, 40])
def test_on_cuda_flash_with_fewer_queries_than_keys_equals_the_per_sequence_reference(window):
    """FlashAttention varlen where some sequences run only their last queries (a shared prefix's
    own tokens) aligns them at the end of their keys, windowed or not, with fewer key/value heads
    (GQA): equal to the CPU's path in float64 to bf16 rounding; aligned at the start it differs."""
    q, k, v, cu_q, cu_k = attention_inputs(torch.bfloat16, "cuda")
    flash = alto.attention._flash(q, k, v, cu_q, cu_k, max(QUERIES), max(KEYS), None, window).double()
    q, k, v = (t.double() for t in (q, k, v))
    torch.testing.assert_close(flash, alto.attention._per_sequence(q, k, v, cu_q, cu_k, None, window),
                               rtol=2e-2, atol=2e-2)
    if window is None:
        assert not torch.allclose(flash, aligned_at_the_start(q, k, v, cu_q, cu_k), rtol=2e-2, atol=2e-2)
