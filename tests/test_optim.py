"""MultiAdamW = torch.optim.AdamW + clip_grad_norm_ run separately for every adapter, stepped over
the packs by one op (alto::packed_adamw_)."""
import math

import pytest
import torch

import alto_ext

from alto.model import MultiLoraModel
from alto.optim import MultiAdamW
from alto.registry import AdapterConfig
from conftest import tiny_model

# lr, weight decay, max norm; ranks and targets differ (odd widths: intermediate 87 rows of q..v are
# vectorized, gate/up/down's are not)
HP = {"a": (1e-3, 0.0, 1.0), "b": (3e-2, 0.1, None), "c": (5e-4, 0.01, 1e-3)}
TARGETS = {"a": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           "b": ("q_proj", "v_proj"), "c": ("down_proj", "gate_proj", "k_proj")}
RANKS = {"a": 3, "b": 8, "c": 5}
# float32: equal to float32 rounding (torch's own fused and foreach AdamW differ as much); float64:
# equal to float64 rounding.
TOLERANCES = {torch.float32: (1e-6, 1e-7), torch.float64: (1e-12, 1e-14)}  # rtol, atol


def build(device, dtype, ids=tuple(HP)):
    model = MultiLoraModel(tiny_model("Llama", dtype, intermediate_size=87).to(device))
    model.add_adapters({a: AdapterConfig(rank=RANKS[a], alpha=2 * RANKS[a], target_modules=TARGETS[a], seed=i)
                        for i, a in enumerate(ids)})
    for layer in model.layers.values():  # B = 0 (PEFT's init) would leave B's first step special
        layer.lora_B.data.normal_()
    opt = MultiAdamW(model)
    for a in ids:
        opt.add(a, HP[a][1])
    return model, opt


def fresh_grads(model, skip_layer: str | None = None):
    for path, layer in model.layers.items():
        for p in layer.packs():
            p.grad = None if path == skip_layer or not layer.order else torch.randn_like(p) * 3


def reference(model, ids):
    """Each adapter's weights as separate leaf tensors, with torch.optim.AdamW over them."""
    params, opts = {}, {}
    for a in ids:
        params[a] = [torch.nn.Parameter(v.clone()) for v in model.adapter_tensors(a)[0]]
        opts[a] = torch.optim.AdamW(params[a], lr=HP[a][0], weight_decay=HP[a][1])
    return params, opts


def reference_step(model, params, opts, ids):
    for a in ids:
        for p, g in zip(params[a], model.adapter_tensors(a)[1]):
            p.grad = None if g is None else g.clone()
        live = [p for p in params[a] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(live, HP[a][2] or math.inf)
        opts[a].step()


@pytest.mark.parametrize("dtype", TOLERANCES)
def test_matches_torch_adamw_and_clipping_per_adapter(device, dtype):
    rtol, atol = TOLERANCES[dtype]
    model, opt = build(device, dtype)
    params, opts = reference(model, HP)
    # step 1 steps b alone (the others accumulating); the last leaves one layer without gradients
    # (last: its tensors' step count stays behind in torch, which counts per tensor, not per adapter)
    plans = [list(HP), ["b"], list(HP), ["a", "c"], list(HP)]
    for step, ids in enumerate(plans):
        fresh_grads(model, skip_layer="model.layers.1.mlp.gate_proj" if step == len(plans) - 1 else None)
        before = {a: [v.clone() for v in model.adapter_tensors(a)[0]] for a in HP}
        norms = opt.step(ids, [HP[a][0] for a in ids], [HP[a][2] for a in ids], model.grad_norms(ids))
        reference_step(model, params, opts, ids)
        for a in HP:
            for i, (ours, ref, old) in enumerate(zip(model.adapter_tensors(a)[0], params[a], before[a])):
                if a not in ids:
                    assert torch.equal(ours, old), (a, step, i)  # not stepped: untouched
                else:
                    assert torch.allclose(ours, ref, rtol=rtol, atol=atol), (a, step, i, (ours - ref).abs().max())
        assert torch.isfinite(norms).all()
    counts = {a: s["step"] for a, s in opt.states(list(HP)).items()}
    assert counts == {a: sum(a in ids for ids in plans) for a in HP}
    for a in HP:  # moments too (torch keeps them per parameter; near-zero ones differ by a few ulps of 1)
        state = opt.states([a])[a]
        for m, v, p in zip(state["exp_avg"], state["exp_avg_sq"], params[a]):
            assert torch.allclose(m, opts[a].state[p]["exp_avg"], rtol=rtol, atol=10 * atol)
            assert torch.allclose(v, opts[a].state[p]["exp_avg_sq"], rtol=rtol, atol=10 * atol)


def test_non_finite_norm_skips_that_adapter_on_the_device(device):
    model, opt = build(device, torch.float32, ids=("a", "b"))
    fresh_grads(model)
    for g in model.adapter_tensors("a")[1][:2]:
        g.fill_(float("inf"))
    before = {a: [v.clone() for v in model.adapter_tensors(a)[0]] for a in ("a", "b")}
    norms = opt.step(["a", "b"], [1e-2, 1e-2], [1.0, 1.0], model.grad_norms(["a", "b"])).tolist()
    assert not math.isfinite(norms[0]) and math.isfinite(norms[1])
    states = opt.states(["a", "b"])
    # a: weights, moments and step count as they were; b stepped
    assert all(torch.equal(v, w) for v, w in zip(model.adapter_tensors("a")[0], before["a"]))
    assert states["a"]["step"] == 0 and all(torch.count_nonzero(m) == 0 for m in states["a"]["exp_avg"])
    assert not any(torch.equal(v, w) for v, w in zip(model.adapter_tensors("b")[0], before["b"]))
    assert states["b"]["step"] == 1


def test_state_survives_removal_and_return_and_slots_are_reused(device):
    """An adapter taken out (its state copied) and put back continues bit for bit as one never taken
    out; one added into a freed slot starts fresh while the others' moments move with their rows."""
    model, opt = build(device, torch.float32)
    twin, twin_opt = build(device, torch.float32)
    with torch.no_grad():
        for a in HP:
            for dst, src in zip(twin.adapter_tensors(a)[0], model.adapter_tensors(a)[0]):
                dst.copy_(src)

    def step_both(ids):
        fresh_grads(model)
        for layer in twin.layers.values():
            for p in layer.packs():
                p.grad = torch.zeros_like(p)
        for a in ids:
            for dst, src in zip(twin.adapter_tensors(a)[1], model.adapter_tensors(a)[1]):
                dst.copy_(src)
        for m, o in ((model, opt), (twin, twin_opt)):
            o.step(ids, [HP[a][0] for a in ids], [HP[a][2] for a in ids], m.grad_norms(ids))

    step_both(list(HP))
    saved = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in opt.states(["a"])["a"].items()}
    weights, config = model.adapter_weights("a"), model.configs["a"]
    model.remove_adapters(["a"])
    opt.remove(["a"])
    model.add_adapters({"d": AdapterConfig(rank=4, target_modules=("q_proj", "up_proj"), seed=9)})
    opt.add("d", 0.0)  # a's freed slot
    assert opt.slots["d"] == 0 and opt.states(["d"])["d"]["step"] == 0
    assert all(torch.count_nonzero(m) == 0 for m in opt.states(["d"])["d"]["exp_avg_sq"])
    step_both(["b", "c"])  # twin's a is not stepped either
    model.add_adapters({"a": config}, {"a": weights})
    opt.add("a", HP["a"][1])
    opt.load("a", saved)
    step_both(list(HP))
    for a in HP:
        assert all(torch.equal(x, y) for x, y in zip(model.adapter_tensors(a)[0], twin.adapter_tensors(a)[0])), a
    assert {a: s["step"] for a, s in opt.states(list(HP)).items()} == {"a": 2, "b": 3, "c": 3}


def test_no_replaced_pack_is_kept_alive_and_an_emptied_layer_drops_its_moments():
    """Adapters coming or going between steps (an evaluation's, a retirement's) free the old packs at
    once: were they kept until the next step, an evaluation's re-packing would hold twice the memory."""
    import gc
    import weakref

    model, opt = build("cpu", torch.float32, ids=("a", "b"))
    fresh_grads(model)
    opt.step(["a", "b"], [1e-3, 1e-3], [None, None], model.grad_norms(["a", "b"]))
    layer = model.layers["model.layers.0.self_attn.q_proj"]
    old = [weakref.ref(t) for t in layer.packs() + layer.moments]
    model.remove_adapters(["b"])
    opt.remove(["b"])
    gc.collect()
    assert all(ref() is None for ref in old)
    model.remove_adapters(["a"])
    opt.remove(["a"])
    assert all(layer.moments is None for layer in model.layers.values())


def test_packed_adamw_names_a_bad_argument():
    w = torch.zeros(2, 4)
    args = ([w], [torch.ones(2, 4)], [torch.zeros(2, 4)], [torch.zeros(2, 4)], torch.tensor([0, 5], dtype=torch.int32),
            torch.tensor([0], dtype=torch.int32), torch.tensor([[1e-3, 0.0, math.inf]]), torch.ones(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"row_slot\[1\]=5"):
        torch.ops.alto.packed_adamw_(*args, 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must be contiguous and shaped as params\[0\]"):
        torch.ops.alto.packed_adamw_(args[0], args[1], [torch.zeros(4, 2)], *args[3:], 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match=r"slot_call\[1\]=0 is another slot's entry too"):
        torch.ops.alto.packed_adamw_(*args[:4], torch.tensor([0, 1], dtype=torch.int32),
                                     torch.tensor([0, 0], dtype=torch.int32), *args[6:8], torch.zeros(2),
                                     0.9, 0.999, 1e-8)
    assert torch.equal(w, torch.zeros(2, 4))  # nothing written


def _packed_adamw_float64(params, grads, exp_avgs, exp_avg_sqs, row_slot, slot_call, hyper, norms, counts,
                          beta1, beta2, eps):
    """The op's contract (csrc/ops.cpp) written out in float64 PyTorch, slot by slot and row by row:
    torch.optim.AdamW's update after clip_grad_norm_'s clip, on float64 copies (returned)."""
    w, m, v = ([t.double().cpu().clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs))
    counts = counts.double().cpu().clone()
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.shape[0])
    for s, k in enumerate(slot_call.tolist()):
        norm = float(norms[k]) if k >= 0 else math.nan
        if k < 0 or not math.isfinite(norm):
            continue
        lr, wd, max_norm = (float(x) for x in hyper[k])
        counts[s] += 1
        step = float(counts[s])
        clip = min(1.0, max_norm / (norm + 1e-6))
        for i, g in enumerate(grads):
            rows = (row_slot[offsets[i]:offsets[i + 1]] == s).cpu()
            if g is None or not rows.any():
                continue
            grad = g.double().cpu()[rows] * clip
            wi, mi, vi = w[i][rows], m[i][rows], v[i][rows]
            wi = wi - lr * wd * wi
            mi = beta1 * mi + (1 - beta1) * grad
            vi = beta2 * vi + (1 - beta2) * grad * grad
            denom = vi.sqrt() / math.sqrt(1 - beta2 ** step) + eps
            w[i][rows], m[i][rows], v[i][rows] = wi - lr / (1 - beta1 ** step) * mi / denom, mi, vi
    return w, m, v, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_adamw_on_packs_of_several_chunks_and_offset_views_against_float64(device, dtype):
    """The op alone against its contract in float64: packs of several 16,384-element chunks (odd and
    vectorizable widths), a pack at a 16-byte offset (vectorized) and one at an odd offset (not),
    rows of no slot, a slot not stepped, one with a not-finite norm, a pack without gradient."""
    gen = torch.Generator().manual_seed(7)
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)
    backing = randn(3 * 96 * 32 + 4)
    shapes = [(301, 130), (513, 64), (96, 32), (96, 32), (5, 12)]
    params = [randn(*shapes[0]), randn(*shapes[1]), backing[4:4 + 96 * 32].view(96, 32),
              backing[96 * 32 + 5:2 * 96 * 32 + 5].view(96, 32), randn(*shapes[4])]
    grads = [randn(*s) for s in shapes[:4]] + [None]
    exp_avgs = [randn(*s).abs() for s in shapes]
    exp_avg_sqs = [randn(*s).abs() for s in shapes]
    rows = sum(s[0] for s in shapes)
    row_slot = torch.randint(-1, 4, (rows,), generator=gen, dtype=torch.int32).to(device)  # 4 slots
    slot_call = torch.tensor([2, -1, 0, 1], dtype=torch.int32, device=device)  # slot 1 not stepped
    hyper = torch.tensor([[1e-2, 0.1, 0.5], [3e-3, 0.0, math.inf], [5e-2, 0.01, 100.0]], dtype=dtype, device=device)
    norms = torch.tensor([2.0, math.inf, 7.0], dtype=dtype, device=device)  # slot 3's entry: not finite
    counts = torch.tensor([0.0, 4.0, 9.0, 2.0], device=device)
    args = (params, grads, exp_avgs, exp_avg_sqs, row_slot, slot_call, hyper, norms, counts, 0.9, 0.999, 1e-8)
    want = _packed_adamw_float64(*args)
    torch.ops.alto.packed_adamw_(*args)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-13)
    for got_list, want_list in zip((params, exp_avgs, exp_avg_sqs), want[:3]):
        for i, (got, ref) in enumerate(zip(got_list, want_list)):
            torch.testing.assert_close(got.double().cpu(), ref, rtol=rtol, atol=atol, msg=lambda m: f"pack {i}: {m}")
    assert counts.tolist() == want[3].tolist() == [1.0, 4.0, 10.0, 2.0]


@pytest.mark.cuda
def test_packed_adamw_on_cuda_skips_and_raises_a_bad_index():
    """On the GPU a bad index is skipped (never read past; the other rows stepped) and raised: at
    once with sync checks (the suite's), else at the next op; an entry two slots name steps neither."""
    w = torch.zeros(4, 8, device="cuda")
    def call(row_slot, slot_call, sync=True):
        alto_ext.set_sync_checks(sync)
        hyper = torch.tensor([[1e-2, 0.0, math.inf], [1e-2, 0.0, math.inf]], device="cuda")
        torch.ops.alto.packed_adamw_([w], [torch.ones_like(w)], [torch.zeros_like(w)], [torch.zeros_like(w)],
                                     torch.tensor(row_slot, dtype=torch.int32, device="cuda"),
                                     torch.tensor(slot_call, dtype=torch.int32, device="cuda"),
                                     hyper, torch.ones(2, device="cuda"), counts, 0.9, 0.999, 1e-8)
    counts = torch.zeros(2, device="cuda")
    with pytest.raises(ValueError, match=r"row_slot\[2\]=5 is not -1 or a slot < 2"):
        call([0, 1, 5, -1], [0, 1])
    assert (w[:2] != 0).all() and (w[2:] == 0).all() and counts.tolist() == [1.0, 1.0]  # rows 0 and 1 stepped
    with pytest.raises(ValueError, match=r"slot_call\[1\]=2 is not -1 or an entry < 2"):
        call([0, 1, 1, 1], [0, 2])
    w.zero_()
    counts.zero_()
    with pytest.raises(ValueError, match=r"slot_call\[1\]=0 is another slot's entry too|slot_call\[0\]=0 is another"):
        call([0, 1, 1, 1], [0, 0])
    assert (w == 0).all() and counts.tolist() == [0.0, 0.0]  # neither slot stepped
    call([0, 0, -1, -2], [0, -1], sync=False)  # deferred: raised by the next check
    with pytest.raises(ValueError, match=r"row_slot\[3\]=-2"):
        alto_ext.check_errors()
    alto_ext.check_errors()  # cleared


def test_segment_sums_sums_consecutive_runs_including_empty_ones():
    from alto_ext.segments import segment_sums

    values = torch.arange(12, dtype=torch.float64).view(2, 6)
    out = segment_sums(values, [2, 0, 3, 1])
    expected = torch.stack([values[:, 0:2].sum(1), torch.zeros(2, dtype=torch.float64),
                            values[:, 2:5].sum(1), values[:, 5:6].sum(1)], dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(segment_sums(torch.zeros(0), [0, 0]), torch.zeros(2))


def test_packed_adamw_opcheck(device):
    dtype = torch.float32
    params = [torch.randn(3, 8, device=device, dtype=dtype), torch.randn(5, 6, device=device, dtype=dtype)]
    grads = [torch.randn_like(p) for p in params]
    moments = [torch.rand_like(p) for p in params * 2]
    row_slot = torch.tensor([0, 0, 1, 1, -1, 1, 0, 0], dtype=torch.int32, device=device)
    args = (params, grads, moments[:2], moments[2:], row_slot,
            torch.tensor([1, 0], dtype=torch.int32, device=device),
            torch.tensor([[1e-3, 0.1, 1.0], [1e-2, 0.0, math.inf]], dtype=dtype, device=device),
            torch.tensor([0.5, 3.0], dtype=dtype, device=device), torch.zeros(2, device=device), 0.9, 0.999, 1e-8)
    torch.library.opcheck(torch.ops.alto.packed_adamw_, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_sq_norms_against_float64(device, dtype):
    """Each row's sum of squares, rows of all tensors end to end: odd widths (no 16-byte loads), an
    empty tensor between others, views at an odd offset (contiguous, unaligned: a width of 16-byte
    loads read element by element) and at a 16-byte offset (vectorized)."""
    backing = torch.randn(7 * 33 + 1 + 7 * 32 + 1 + 4 + 9 * 32, device=device, dtype=dtype)
    odd = backing[1 : 1 + 7 * 33].view(7, 33)
    unaligned = backing[7 * 33 + 2 : 7 * 33 + 2 + 7 * 32].view(7, 32)
    start = -(-(7 * 33 + 2 + 7 * 32) // 4) * 4  # a 16-byte (and 32-byte) boundary after them
    aligned = backing[start : start + 9 * 32].view(9, 32)
    tensors = [torch.randn(5, 96, device=device, dtype=dtype), torch.randn(0, 8, device=device, dtype=dtype),
               torch.randn(3, 87, device=device, dtype=dtype) * 100, odd, unaligned, aligned,
               torch.randn(300, 4, device=device, dtype=dtype)]
    got = torch.ops.alto.row_sq_norms(tensors)
    want = torch.cat([t.double().square().sum(1) for t in tensors])
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-13, atol=0)
    with pytest.raises(ValueError, match=r"tensors\[1\] must be a 2-D contiguous float32 or float64 tensor"):
        torch.ops.alto.row_sq_norms([tensors[0], tensors[0].t()])
    with pytest.raises(ValueError, match=r"tensors\[0\] must be a 2-D contiguous float32 or float64 tensor, got BFloat16"):
        torch.ops.alto.row_sq_norms([tensors[0].bfloat16()])
