"""multi_lora_linear (base + all adapters in one autograd node) against the float64 per-adapter
reference, forward and backward; torch.compile tracing; on CUDA, proof the CUTLASS path ran."""
import dataclasses
import warnings

import pytest

import torch

import alto_ext
from alto_ext import reference as ref
from alto_ext import Segments, StackedSegments

CASES = [
    ([4, 0, 9], [2, 8, 1], 24, 40),
    ([1], [16], 16, 16),
    ([17, 5, 30, 2], [64, 4, 16, 8], 64, 136),
    ([6, 3], [0, 4], 32, 24),  # an adapter without rank here: its rows are the base's alone
    ([37], [5], 24, 40),  # one adapter (alto_ext.one_adapter: plain GEMMs), a rank not a multiple of 8
]


def leaves(device, dtype, tokens, ranks, d_in, d_out, with_bias, dropout):
    seg = Segments.build(tokens, ranks, [2.0 / (g + 1) for g in range(len(ranks))], device=device)
    T, R = seg.num_tokens, seg.total_rank
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, dtype=torch.float64) * scale)
    tensors = {
        "x": mk(T, d_in),
        "weight": mk(d_out, d_in, scale=d_in**-0.5),
        "bias": mk(d_out) if with_bias else None,
        "A": mk(R, d_in, scale=d_in**-0.5),
        "B": mk(R, d_out),
        "lora_x": mk(T, d_in) if dropout else None,
    }
    return seg, tensors


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_multi_lora_linear_matches_reference(device, case, with_bias, dropout):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tol = 3e-5 if dtype == torch.float32 else 2e-2
    seg, t = leaves(device, dtype, *case, with_bias, dropout)
    ours = {k: (v.to(device, dtype).requires_grad_() if v is not None else None) for k, v in t.items()}
    # Adapter weights stay float32 masters when the compute dtype is lower (autocast-style).
    ours["A"] = t["A"].to(device, torch.float32).requires_grad_()
    ours["B"] = t["B"].to(device, torch.float32).requires_grad_()
    y = alto_ext.multi_lora_linear(ours["x"], ours["weight"], ours["bias"], ours["A"], ours["B"], seg, lora_x=ours["lora_x"])
    assert y.dtype == dtype
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    refs = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in t.items()}
    seg_cpu = Segments.build(seg.token_counts, seg.ranks, seg.scaling.cpu().tolist())
    y_ref = ref.lora_linear(refs["x"], refs["weight"], refs["bias"], refs["A"], refs["B"], seg_cpu, refs["lora_x"])
    y_ref.backward(grad_y.cpu().double())

    assert ref.rel_err(y, y_ref) < tol
    for name in t:
        if t[name] is None:
            continue
        assert ours[name].grad is not None, name
        assert ours[name].grad.dtype == ours[name].dtype, name
        assert ref.rel_err(ours[name].grad, refs[name].grad) < 2 * tol, name


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_delta_matches_reference(device, case, dropout):
    """The adapters' delta alone (for base layers that run their own forward): the reference with
    a zero base weight; float64 on the CPU, bf16 compute with float32 masters on the GPU."""
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    seg, t = leaves(device, dtype, *case, False, dropout)
    x_in = t["lora_x"] if dropout else t["x"]
    x = x_in.to(device, dtype).clone().requires_grad_()
    master = torch.float64 if dtype == torch.float64 else torch.float32
    A, B = (t[k].to(device, master).clone().requires_grad_() for k in "AB")
    seg = Segments.build(seg.token_counts, seg.ranks, seg.scaling.cpu().tolist(), device, master)
    delta = alto_ext.lora_delta(x, A, B, seg)
    grad = torch.randn_like(delta)
    delta.backward(grad)

    refs = {k: t[k].detach().clone().requires_grad_() for k in "AB"}
    x_ref = x_in.detach().clone().requires_grad_()
    zero = torch.zeros(t["weight"].shape, dtype=torch.float64)
    seg_cpu = Segments.build(seg.token_counts, seg.ranks, seg.scaling.cpu().tolist(), None, master)
    y_ref = ref.lora_linear(x_ref, zero, None, refs["A"], refs["B"], seg_cpu)
    y_ref.backward(grad.cpu().double())
    assert ref.rel_err(delta, y_ref) < tol
    for ours, theirs in ((x, x_ref), (A, refs["A"]), (B, refs["B"])):
        assert ours.grad.dtype == ours.dtype
        assert ref.rel_err(ours.grad, theirs.grad) < 2 * tol


def test_frozen_base_gets_no_grad(device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    seg, t = leaves(device, dtype, [3, 5], [4, 2], 16, 24, True, False)
    x = t["x"].to(device, dtype).requires_grad_()
    weight, bias = t["weight"].to(device, dtype), t["bias"].to(device, dtype)
    A = t["A"].to(device, dtype).requires_grad_()
    B = t["B"].to(device, dtype).requires_grad_()
    alto_ext.multi_lora_linear(x, weight, bias, A, B, seg).sum().backward()
    assert weight.grad is None and bias.grad is None
    assert A.grad is not None and B.grad is not None and x.grad is not None


def test_token_count_mismatch_is_clear():
    seg = Segments.build([3, 5], [4, 2])
    x = torch.randn(7, 16)
    with pytest.raises(ValueError, match="x has 7 tokens but the segments cover 8"):
        alto_ext.multi_lora_linear(x, torch.randn(8, 16), None, torch.randn(6, 16), torch.randn(6, 8), seg)


@pytest.mark.parametrize("tokens, ranks, scaling", [([3, 0, 5], [2, 4, 8], [1.0, 0.5, 2.0]),
                                                    ([8], [6], [0.5])])  # one adapter: alto_ext.one_adapter
def test_torch_compile_traces_the_ops(tokens, ranks, scaling):
    """Fake kernels + autograd registrations let torch.compile trace forward and backward."""
    seg = Segments.build(tokens, ranks, scaling)
    x = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(24, 16)
    A = torch.randn(sum(ranks), 16, requires_grad=True)
    B = torch.randn(sum(ranks), 24, requires_grad=True)

    def step(x, A, B):
        return alto_ext.multi_lora_linear(x, weight, None, A, B, seg).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x, A, B)
    loss.backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    eager = step(x, A, B)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-5)
    for got, t in zip(grads, (x, A, B)):
        assert torch.allclose(got, t.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_runs_cutlass_kernels_not_the_fallback():
    seg = Segments.build([64, 0, 33], [8, 16, 32], [1.0, 2.0, 0.5], device="cuda")
    x = torch.randn(97, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(56, 256, device="cuda", requires_grad=True)
    B = torch.randn(56, 512, device="cuda", requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        alto_ext.multi_lora_linear(x, weight, None, A, B, seg).float().sum().backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    cutlass = [n for n in names if "cutlass" in n.lower() or "GemmUniversal" in n]
    setups = [n for n in names if "setup_problems" in n]
    # forward: shrink + expand; backward: shrink (dh), expand (dX), two weight grads
    assert len(setups) == 6, names
    assert len(cutlass) >= 6, names


@pytest.mark.cuda
def test_cuda_outputs_do_not_depend_on_stale_memory():
    """Poison the caching allocator with NaN first (its large and its small-block pool): any
    element a kernel fails to write shows."""
    seg = Segments.build([40, 0, 25, 1], [8, 16, 1, 64], [1.0, 2.0, 0.5, 1.5], device="cuda")
    x = torch.randn(66, 128, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(89, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        poison = [torch.full((1 << 24,), float("nan"), device="cuda")]
        poison += [torch.full((1 << 14,), float("nan"), device="cuda") for _ in range(128)]
        del poison
        h = alto_ext.lora_shrink(x, A, seg.seg_indptr, seg.rank_indptr, seg.h_width, seg.scaling)
        seg_cpu = Segments.build(seg.token_counts, seg.ranks, [1.0, 2.0, 0.5, 1.5])
        assert ref.rel_err(h, ref.shrink(x.cpu(), A.cpu(), seg_cpu, seg.h_width)) < 1.2e-2
        for out_dtype in (None, torch.float32):  # adapter 1 has no tokens: its rows must be zeroed
            gw = alto_ext.lora_weight_grad(h, x, seg.seg_indptr, seg.rank_indptr, seg.total_rank, seg.scaling,
                                           out_dtype)
            assert ref.rel_err(gw, ref.weight_grad(h.cpu(), x.cpu(), seg_cpu, seg.total_rank)) < 1.2e-2
            assert torch.count_nonzero(gw[8:24]) == 0


@pytest.mark.parametrize("tokens, ranks, scaling", [([5, 3], [4, 8], [1.0, 2.0]), ([8], [12], [0.5])])
def test_autocast_runs_in_the_autocast_dtype_with_float32_adapter_grads(tokens, ranks, scaling):
    seg = Segments.build(tokens, ranks, scaling)
    x = torch.randn(8, 32, requires_grad=True)
    weight, bias = torch.randn(24, 32), torch.randn(24)
    A = torch.randn(12, 32, requires_grad=True)
    B = torch.randn(12, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = alto_ext.multi_lora_linear(x, weight, bias, A, B, seg)
    assert y.dtype == torch.bfloat16
    grad_y = torch.randn(8, 24)
    y.float().backward(grad_y)
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y_ref = ref.lora_linear(leaves[0], weight.double(), bias.double(), leaves[1], leaves[2], seg)
    y_ref.backward(grad_y.double())
    assert ref.rel_err(y, y_ref) < 2e-2
    for got, want in zip((x.grad, A.grad, B.grad), leaves):  # bf16 operands, float32 gradients
        assert ref.rel_err(got, want.grad) < 4e-2


def test_one_adapter_takes_its_scale_from_the_device_where_the_host_has_none():
    """A Segments made by its constructor or dataclasses.replace has no host scale (scale_values None): its one
    adapter runs through the grouped ops, at the scaling tensor's scale; built, it has one (plain GEMMs), or none
    at all for scaling None (a scale of 1)."""
    built = Segments.build([6], [4], [2.0], None, torch.float64)
    x, W = torch.randn(6, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    A, B = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    half = dataclasses.replace(built, scaling=torch.tensor([0.5], dtype=torch.float64))
    unscaled = Segments.build([6], [4])
    assert built.scale_values == (2.0,) and half.scale_values is None and unscaled.scale_values == ()
    for seg, scale in ((built, 2.0), (half, 0.5), (unscaled, 1.0)):
        y = alto_ext.multi_lora_linear(x, W, None, A, B, seg)
        assert torch.allclose(y, x @ W.T + scale * (x @ A.T) @ B, rtol=1e-12, atol=1e-12), scale


# Stacked projections of one x: per adapter (tokens, rank of each projection); 0 = not targeted there.
STACK_CASES = [
    ([4, 0, 9, 5], [[2, 8, 1, 0], [2, 8, 0, 0], [2, 0, 1, 0]], 24, [40, 16, 16]),  # q, k, v of odd widths
    ([17, 5, 30], [[64, 4, 16], [64, 4, 16]], 64, [136, 136]),  # gate, up
    ([6, 3], [[0, 4], [3, 0]], 32, [24, 8]),  # no adapter in both: rows the base's alone in one
    ([29], [[5], [3], [5]], 24, [40, 16, 16]),  # one adapter (plain GEMMs), ranks that differ between projections
]


@pytest.mark.parametrize("case", STACK_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_stacked_projections_match_separate_ones(device, case, with_bias):
    """multi_lora_linear_stack gives every projection's output and every gradient that separate
    multi_lora_linear calls give (float64 on the CPU: the same sums in another order), and the float64
    per-adapter reference's (within float64's rounding on the CPU, bf16's on the GPU)."""
    tokens, ranks, d_in, d_outs = case
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    master = torch.float64 if device.type == "cpu" else torch.float32
    scaling = [2.0 / (g + 1) for g in range(len(tokens))]
    parts = [Segments.build(tokens, r, scaling, device, master) for r in ranks]
    T = sum(tokens)
    x = torch.randn(T, d_in, dtype=torch.float64)
    weights = [torch.randn(d, d_in, dtype=torch.float64) * d_in**-0.5 for d in d_outs]
    biases = [torch.randn(d, dtype=torch.float64) if with_bias and p != 1 else None for p, d in enumerate(d_outs)]
    As = [torch.randn(sum(r), d_in, dtype=torch.float64) * d_in**-0.5 for r in ranks]
    Bs = [torch.randn(sum(r), d, dtype=torch.float64) for r, d in zip(ranks, d_outs)]
    grads = [torch.randn(T, d, dtype=torch.float64) for d in d_outs]

    def run(stacked: bool):
        leaf = lambda t, dt: None if t is None else t.to(device, dt).clone().requires_grad_()
        xs, ws, bs = leaf(x, dtype), [leaf(w, dtype) for w in weights], [leaf(b, dtype) for b in biases]
        a_s, b_s = [leaf(a, master) for a in As], [leaf(b, master) for b in Bs]
        if stacked:
            ys = alto_ext.multi_lora_linear_stack(xs, ws, bs, a_s, b_s, parts, StackedSegments.build(parts, device))
        else:
            ys = [alto_ext.multi_lora_linear(xs, w, b, a, bb, s) for w, b, a, bb, s in zip(ws, bs, a_s, b_s, parts)]
        torch.autograd.backward(ys, [g.to(device, dtype) for g in grads])
        return ys, [xs.grad, *(w.grad for w in ws), *(b.grad for b in bs if b is not None),
                    *(a.grad for a in a_s), *(b.grad for b in b_s)]

    ys, got = run(stacked=True)
    seg_cpu = [Segments.build(tokens, r, scaling, None, torch.float64) for r in ranks]
    xr = x.clone().requires_grad_()
    wr = [w.clone().requires_grad_() for w in weights]
    br = [None if b is None else b.clone().requires_grad_() for b in biases]
    ar, bbr = [a.clone().requires_grad_() for a in As], [b.clone().requires_grad_() for b in Bs]
    ref_ys = [ref.lora_linear(xr, w, b, a, bb, s) for w, b, a, bb, s in zip(wr, br, ar, bbr, seg_cpu)]
    torch.autograd.backward(ref_ys, grads)
    ref_grads = [xr.grad, *(w.grad for w in wr), *(b.grad for b in br if b is not None),
                 *(a.grad for a in ar), *(b.grad for b in bbr)]
    tol = 1e-12 if device.type == "cpu" else 2e-2
    checks = [(ref_ys, ref_grads)] + ([run(stacked=False)] if device.type == "cpu" else [])
    for want_ys, want in checks:
        for y, w in zip(ys, want_ys):
            assert ref.rel_err(y, w) < tol
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g is not None and ref.rel_err(g, w) < 2 * tol, i


def test_stacked_segments_place_each_projection_in_its_column_block():
    """The layout itself: adapter rows of projection p at block p, zero-row padding up to the width."""
    parts = [Segments.build([3, 2, 4], r) for r in ([2, 0, 9], [2, 0, 0])]
    stacked = StackedSegments.build(parts)
    assert stacked.width == 16 and stacked.segments.ranks == (32, 0, 32)
    zero = 11 + 2  # rows of the concatenated A's: q's 11, k's 2, then the zero row
    assert stacked.gather.tolist() == ([0, 1] + [zero] * 14 + [11, 12] + [zero] * 14
                                       + list(range(2, 11)) + [zero] * 7 + [zero] * 16)
    assert stacked.rows[0].tolist() == [0, 1] + list(range(32, 41))
    assert stacked.rows[1].tolist() == [16, 17]
    with pytest.raises(ValueError, match="one token layout"):
        StackedSegments.build([Segments.build([3], [2]), Segments.build([4], [2])])
    x, A = torch.randn(9, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match=r"projection 1\): no base weight"):
        alto_ext.multi_lora_linear_stack(x, [torch.randn(4, 8), None], [None, None], [A, A[:2]],
                                         [torch.randn(11, 4), torch.randn(2, 4)], parts, stacked)
    with pytest.raises(ValueError, match=r"projection 0\): x has 9 tokens but the segments cover 10"):
        bad = [Segments.build([3, 3, 4], r) for r in ([2, 0, 9], [2, 0, 0])]
        alto_ext.multi_lora_linear_stack(x, [torch.randn(4, 8)] * 2, [None, None], [A, A[:2]],
                                         [torch.randn(11, 4), torch.randn(2, 4)], bad, StackedSegments.build(bad))


def test_second_order_gradients_match_the_reference():
    """A backward that builds a graph (create_graph) stays differentiable: the gradient of A's
    gradient with respect to B and x equals the float64 reference's (the ops' autograd layer is
    skipped only in plain backwards)."""
    seg = Segments.build([3, 0, 4], [2, 4, 3], [1.0, 2.0, 0.5], None, torch.float64)
    t = {"x": torch.randn(7, 8), "A": torch.randn(9, 8), "B": torch.randn(9, 6)}
    w = torch.randn(6, 8, dtype=torch.float64)
    results = []
    for fn in (lambda x, A, B: alto_ext.multi_lora_linear(x, w, None, A, B, seg),
               lambda x, A, B: ref.lora_linear(x, w, None, A, B, seg)):
        x, A, B = (t[k].double().requires_grad_() for k in "xAB")
        with warnings.catch_warnings(record=True) as caught:  # every op on the way has its autograd formula
            warnings.simplefilter("always")
            (grad_a,) = torch.autograd.grad(fn(x, A, B).square().sum(), A, create_graph=True)
            results.append(torch.autograd.grad(grad_a.square().sum(), [x, B]))
        assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
    for ours, want in zip(*results):
        assert ref.rel_err(ours, want) < 1e-12
