"""Every op against the float64 oracle, forward and backward, on fresh random inputs and odd
shapes; gradcheck; torch.library.opcheck; G up to 256."""
import os

import pytest
import torch

import alto_ext
from alto_ext import reference as ref
from alto_ext import Segments

# (tokens per adapter, rank per adapter, d_in, d_out): empty segments, one token, rank 1,
# rank 0, sizes that are not multiples of 16 (and of 8: those take the reference path on CUDA).
CASES = [
    ([5], [1], 16, 24),
    ([3, 0, 7], [2, 4, 1], 24, 40),
    ([1, 1, 1], [8, 16, 3], 72, 8),
    ([0, 0], [4, 2], 16, 16),
    ([6, 4], [0, 5], 32, 16),
    ([33, 17, 64, 2], [64, 8, 32, 16], 136, 200),
    ([9, 11], [3, 7], 100, 52),
    ([], [], 16, 16),
]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def dtypes_for(device):
    return [torch.float32, torch.bfloat16] if device.type == "cpu" else [torch.bfloat16, torch.float16]


def make_case(tokens, ranks, d_in, d_out, device, dtype, scaled=True):
    scaling = [0.5 + g for g in range(len(ranks))] if scaled else None
    seg = Segments.build(tokens, ranks, scaling, device=device)
    T, R = seg.num_tokens, seg.total_rank
    x = torch.randn(T, d_in, device=device, dtype=dtype)
    A = torch.randn(R, d_in, device=device, dtype=dtype) / d_in**0.5
    B = torch.randn(R, d_out, device=device, dtype=dtype)
    return seg, x, A, B


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scaled", [True, False])
def test_shrink_matches_reference(device, case, scaled):
    for dtype in dtypes_for(device):
        seg, x, A, _ = make_case(*case, device, dtype, scaled)
        h = alto_ext.lora_shrink(x, A, seg.seg_indptr, seg.rank_indptr, seg.h_width, seg.scaling)
        assert h.shape == (seg.num_tokens, seg.h_width) and h.dtype == dtype
        assert ref.rel_err(h, ref.shrink(x.cpu(), A.cpu(), seg, seg.h_width)) < TOL[dtype]


@pytest.mark.parametrize("case", CASES)
def test_expand_matches_reference(device, case):
    for dtype in dtypes_for(device):
        seg, x, A, B = make_case(*case, device, dtype)
        h = torch.randn(seg.num_tokens, seg.h_width, device=device, dtype=dtype)
        y = torch.randn(seg.num_tokens, B.shape[1], device=device, dtype=dtype)
        expected = ref.expand(y.cpu(), h.cpu(), B.cpu(), seg)
        out = alto_ext.lora_expand(y, h, B, seg.seg_indptr, seg.rank_indptr, seg.scaling)
        assert ref.rel_err(out, expected) < TOL[dtype]
        y_in_place = y.clone()
        alto_ext.lora_expand_(y_in_place, h, B, seg.seg_indptr, seg.rank_indptr, seg.scaling)
        assert torch.equal(y_in_place, out)


@pytest.mark.parametrize("case", CASES)
def test_expand_without_accumulate_writes_rows_it_does_not_read(device, case):
    """accumulate=False: rows of adapters with a rank get s_g h W_g whatever y held (NaN here);
    rows of rank-0 adapters stay exactly as they were."""
    for dtype in dtypes_for(device):
        seg, _, _, B = make_case(*case, device, dtype)
        T = seg.num_tokens
        h = torch.randn(T, seg.h_width, device=device, dtype=dtype)
        covered = torch.zeros(T, dtype=torch.bool)
        t0 = 0
        for n, r in zip(seg.token_counts, seg.ranks):
            covered[t0 : t0 + n] = r > 0
            t0 += n
        y = torch.randn(T, B.shape[1], device=device, dtype=dtype)
        y[covered.to(device)] = float("nan")
        out = y.clone()
        alto_ext.lora_expand_(out, h, B, seg.seg_indptr, seg.rank_indptr, seg.scaling, accumulate=False)
        expected = ref.expand(torch.zeros(T, B.shape[1]), h.cpu(), B.cpu(), seg)
        assert ref.rel_err(out.cpu()[covered], expected[covered]) < TOL[dtype]
        assert torch.equal(out.cpu()[~covered], y.cpu()[~covered])


@pytest.mark.parametrize("case", CASES)
def test_weight_grad_matches_reference(device, case):
    for dtype in dtypes_for(device):
        seg, x, _, _ = make_case(*case, device, dtype)
        h = torch.randn(seg.num_tokens, seg.h_width, device=device, dtype=dtype)
        out = alto_ext.lora_weight_grad(h, x, seg.seg_indptr, seg.rank_indptr, seg.total_rank, seg.scaling)
        assert out.shape == (seg.total_rank, x.shape[1])
        expected = ref.weight_grad(h.cpu(), x.cpu(), seg, seg.total_rank)
        assert ref.rel_err(out, expected) < TOL[dtype]


@pytest.mark.parametrize("case", CASES)
def test_weight_grad_writes_float32_for_float32_master_weights(device, case):
    """out_dtype=float32 from low-precision inputs: the fp32 accumulator is written as it is, so
    the result is as close to the float64 oracle as float32 sums allow (not bf16-rounded)."""
    for dtype in dtypes_for(device):
        seg, x, _, _ = make_case(*case, device, dtype)
        h = torch.randn(seg.num_tokens, seg.h_width, device=device, dtype=dtype)
        out = alto_ext.lora_weight_grad(h, x, seg.seg_indptr, seg.rank_indptr, seg.total_rank, seg.scaling,
                                        out_dtype=torch.float32)
        assert out.dtype == torch.float32 and out.shape == (seg.total_rank, x.shape[1])
        expected = ref.weight_grad(h.cpu(), x.cpu(), seg, seg.total_rank)
        assert ref.rel_err(out, expected) < 2e-5


@pytest.mark.parametrize("case", CASES)
def test_op_autograd_matches_reference(device, case):
    """Backward of lora_shrink -> lora_expand through the registered autograd formulas."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    seg, x, A, B = make_case(*case, device, dtype)
    y0 = torch.randn(seg.num_tokens, B.shape[1], device=device, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, y0)]
    xl, Al, Bl, yl = leaves
    h = alto_ext.lora_shrink(xl, Al, seg.seg_indptr, seg.rank_indptr, seg.h_width)
    out = alto_ext.lora_expand(yl, h, Bl, seg.seg_indptr, seg.rank_indptr, seg.scaling)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (x, A, B, y0)]
    rx, rA, rB, ry = ref_leaves
    expected = ref.lora_linear(rx, torch.zeros(B.shape[1], x.shape[1], dtype=torch.float64), None, rA, rB, seg) + ry
    expected.backward(grad_out.cpu().double())
    assert ref.rel_err(out, expected) < TOL[dtype]
    for got, want in zip(leaves, ref_leaves):
        want_grad = torch.zeros_like(want) if want.grad is None else want.grad  # no adapters
        assert ref.rel_err(got.grad, want_grad) < TOL[dtype] * 2


def _matmul_case(tokens, ranks, K, N, device, dtype, orientation, scaled):
    """a [T, K], b (``forward``: a weight [N, K] transposed, as a linear's forward passes it;
    ``dx``: a weight [K, N] as its dX passes it), h [T, H] (H: the widest rank rounded up to 8), W [R, N]."""
    seg, a, _, W = make_case(tokens, ranks, K, N, device, dtype, scaled)
    b = torch.randn(N, K, device=device, dtype=dtype).t() if orientation == "forward" else torch.randn(
        K, N, device=device, dtype=dtype)
    b = b / K**0.5
    h = torch.randn(seg.num_tokens, -(-max(ranks, default=0) // 8) * 8, device=device, dtype=dtype)
    h = h + 3 * h.sign()  # |h| >= 3 (but at 0): even one token's rank-1 term stands well above the base's
    return seg, a, b, h, W


def _fused_launches(prof) -> int | None:
    """How many fused-GEMM kernels a profile saw. None only under compute-sanitizer (device_run.sh's sanitize
    stage sets ALTO_UNDER_SANITIZER): there CUPTI records no kernel, and the run without it checks which ran."""
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels and os.environ.get("ALTO_UNDER_SANITIZER") == "1":
        return None
    assert kernels, "the profiler saw no kernel (is CUPTI available?)"
    return sum("TwoPhaseMainloop" in name for name in kernels)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("orientation", ["forward", "dx"])
@pytest.mark.parametrize("scaled", [True, False])
def test_matmul_matches_reference(device, case, orientation, scaled):
    for dtype in dtypes_for(device):
        seg, a, b, h, W = _matmul_case(*case, device, dtype, orientation, scaled)
        out = alto_ext.lora_matmul(a, b, h, W, seg.seg_indptr, seg.rank_indptr, seg.scaling)
        expected = ref.expand(a.cpu().double() @ b.cpu().double(), h.cpu(), W.cpu(), seg)
        assert out.shape == expected.shape and out.dtype == dtype
        assert ref.rel_err(out, expected) < TOL[dtype]


# Shapes the fused Hopper kernel takes (K a multiple of its K tile): ranks that are not multiples of 8
# (their columns of the transposed B padded), an empty segment, a rank-0 adapter (base rows only), a
# rank of 128 (two K tiles of h), segments that end inside an M tile, SmolLM2's widths; all but the
# wide ones take the narrow tiles (fewer than one wave of the wide ones). Outputs wider than 2048 columns
# are split in stripes (grouped_gemm.cuh's kStripeColumns), the last one partial.
FUSED_CASES = [
    ([130, 0, 7, 300], [8, 4, 12, 64], 128, 200),
    ([64, 1, 190], [0, 128, 3], 192, 64),
    ([1], [1], 64, 8),
    ([700, 333, 45], [16, 32, 8], 576, 1536),
    ([1400, 2000, 700], [16, 64, 12], 256, 4096),  # enough tiles for the wide ones, an odd count in a segment
    ([130, 0, 77, 9], [8, 16, 5, 0], 64, 4608),  # three stripes of the narrow tiles over four adapters
    ([1400, 2000, 700], [16, 128, 12], 128, 2304),  # two stripes of the wide ones, a rank of two K tiles
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("orientation,scaled", [("forward", True), ("forward", False), ("dx", False), ("dx", True)])
def test_fused_matmul_matches_reference(case, orientation, scaled):
    """On Hopper the fused GEMM runs (its kernel seen in a profile), against the float64 oracle; the
    adapters' term is far above the tolerance, so a kernel that dropped it (or one adapter's) fails.
    A scaled dX is not fused (its kernel has no scaling: multi_lora_linear's dh carries it), nor fp16 (the
    fused kernels are built for bf16 only): both take a @ b then the expand, against the same oracle."""
    device = torch.device("cuda")
    hopper = torch.cuda.get_device_capability()[0] == 9
    for dtype in (torch.bfloat16, torch.float16):
        seg, a, b, h, W = _matmul_case(*case, device, dtype, orientation, scaled)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = alto_ext.lora_matmul(a, b, h, W, seg.seg_indptr, seg.rank_indptr, seg.scaling)
            torch.cuda.synchronize()
        launches = _fused_launches(prof)
        takes = hopper and dtype == torch.bfloat16 and not (orientation == "dx" and scaled)
        assert launches is None or (launches > 0) == takes, f"fused kernels: {launches}, Hopper: {hopper}, {dtype}"
        base = (a.double() @ b.double()).cpu()  # float64 on the GPU (the widest cases' products on a CPU take long)
        expected = ref.expand(base, h.cpu(), W.cpu(), seg)
        t0 = 0
        for n, r in zip(seg.token_counts, seg.ranks):  # each adapter's rows on their own
            if n and r:
                rows = slice(t0, t0 + n)
                assert ref.rel_err(expected[rows], base[rows]) > 20 * TOL[dtype]  # (what a dropped term would miss by)
                assert ref.rel_err(out[rows], expected[rows]) < TOL[dtype]
            t0 += n
        assert ref.rel_err(out, expected) < TOL[dtype]


@pytest.mark.cuda
def test_fused_linear_and_stack_match_reference():
    """multi_lora_linear and a q/k/v stack at widths the fused GEMMs take (forward, and dX with the stack's
    h and gathered A), bf16 against the float64 oracle, forward and backward."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    tokens, d_in, d_outs = [200, 0, 77], 128, [128, 64, 64]
    parts = [Segments.build(tokens, ranks, [2.0, 1.0, 0.5], device=device) for ranks in ([8, 4, 12], [16, 0, 8], [8, 8, 8])]
    stacked = alto_ext.StackedSegments.build(parts, device=device)
    x = torch.randn(sum(tokens), d_in, device=device, dtype=dtype)
    weights = [torch.randn(d, d_in, device=device, dtype=dtype) / d_in**0.5 for d in d_outs]
    As = [torch.randn(s.total_rank, d_in, device=device, dtype=torch.float32) / d_in**0.5 for s in parts]
    Bs = [torch.randn(s.total_rank, d, device=device, dtype=torch.float32) for s, d in zip(parts, d_outs)]
    leaves = [t.clone().requires_grad_() for t in (x, *As, *Bs)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ys = alto_ext.multi_lora_linear_stack(leaves[0], weights, [None] * 3, leaves[1:4], leaves[4:], parts, stacked)
        y0 = alto_ext.multi_lora_linear(leaves[0], weights[0], None, leaves[1], leaves[4], parts[0])
        grads = [torch.randn_like(y) for y in ys]
        torch.autograd.backward([*ys, y0], [*grads, grads[0]])
        torch.cuda.synchronize()
    if torch.cuda.get_device_capability()[0] == 9:
        launches = _fused_launches(prof)
        assert launches is None or launches >= 6  # 4 forward products, 2 dX
    refs = [t.detach().cpu().double().requires_grad_() for t in (x, *As, *Bs)]
    ref_ys = [ref.lora_linear(refs[0], w.cpu().double(), None, A, B, s) for w, A, B, s in zip(weights, refs[1:4], refs[4:], parts)]
    ref_y0 = ref.lora_linear(refs[0], weights[0].cpu().double(), None, refs[1], refs[4], parts[0])
    torch.autograd.backward([*ref_ys, ref_y0], [g.cpu().double() for g in (*grads, grads[0])])
    for got, want in zip([*ys, y0], [*ref_ys, ref_y0]):
        assert ref.rel_err(got, want) < TOL[dtype]
    for got, want in zip(leaves, refs):
        assert ref.rel_err(got.grad, want.grad) < 2 * TOL[dtype]


def test_gradcheck_float64():
    seg = Segments.build([3, 0, 4], [2, 3, 1], [0.5, 1.5, 2.0])
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    s = (seg.seg_indptr, seg.rank_indptr)

    def chain(x, A, B, y):
        h = alto_ext.lora_shrink(x, A, *s, seg.h_width, seg.scaling)
        return alto_ext.lora_expand(y, h, B, *s, seg.scaling)

    assert torch.autograd.gradcheck(chain, (x, A, B, y))
    h = torch.randn(7, seg.h_width, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, B, y: alto_ext.lora_expand(y, h, B, *s, seg.scaling), (h, B, y))
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, h, B: alto_ext.lora_matmul(x, b, h, B, *s, seg.scaling), (x, b, h, B))
    # lora_weight_grad's own gradients (second-order gradients reach them), h wider than every rank
    assert torch.autograd.gradcheck(lambda h, x: alto_ext.lora_weight_grad(h, x, *s, seg.total_rank, seg.scaling), (h, x))


def _opcheck_samples(device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    seg, x, A, B = make_case([4, 0, 3], [2, 5, 8], 16, 24, device, dtype)
    s = (seg.seg_indptr, seg.rank_indptr)
    h = torch.randn(seg.num_tokens, seg.h_width, device=device, dtype=dtype)
    y = torch.randn(seg.num_tokens, 24, device=device, dtype=dtype)
    return [
        (torch.ops.alto.lora_shrink, (x.requires_grad_(), A.requires_grad_(), *s, seg.h_width, seg.scaling)),
        (torch.ops.alto.lora_expand, (y.requires_grad_(), h.requires_grad_(), B.requires_grad_(), *s, seg.scaling)),
        (torch.ops.alto.lora_expand_, (y.detach().clone(), h.detach(), B.detach(), *s, seg.scaling)),
        (torch.ops.alto.lora_expand_, (y.detach().clone(), h.detach(), B.detach(), *s, seg.scaling, False)),
        (torch.ops.alto.lora_matmul, (x.detach().requires_grad_(), torch.randn(24, 16, device=device, dtype=dtype).t(),
                                      h.detach().requires_grad_(), B.detach().requires_grad_(), *s, seg.scaling)),
        (torch.ops.alto.lora_weight_grad, (h.detach().requires_grad_(), x.detach().requires_grad_(), *s, seg.total_rank,
                                           seg.scaling)),
        (torch.ops.alto.lora_weight_grad, (h.detach(), x.detach(), *s, seg.total_rank, seg.scaling, torch.float32)),
    ]


def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_many_adapters_g256(device):
    g = 256
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    tokens = torch.randint(0, 5, (g,), generator=gen).tolist()
    ranks = torch.randint(1, 257, (g,), generator=gen).tolist()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    seg, x, A, B = make_case(tokens, ranks, 16, 8, device, dtype)
    h = alto_ext.lora_shrink(x, A, seg.seg_indptr, seg.rank_indptr, seg.h_width, seg.scaling)
    assert ref.rel_err(h, ref.shrink(x.cpu(), A.cpu(), seg, seg.h_width)) < TOL[dtype]
    gw = alto_ext.lora_weight_grad(h, x, seg.seg_indptr, seg.rank_indptr, seg.total_rank)
    assert ref.rel_err(gw, ref.weight_grad(h.cpu(), x.cpu(), Segments.build(tokens, ranks), seg.total_rank)) < TOL[dtype]


# (tokens per adapter, ranks, d): few tokens over a wide x (its K split over the SMs: an empty adapter,
# a rank-0 one, an odd d whose last chunk is short) and many tokens (one chunk).
SPLIT_CASES = [([5, 300, 0, 129, 40], [8, 64, 16, 1, 0], 4096), ([7, 2], [3, 24], 2056), ([12000, 9000], [16, 8], 1024)]


def adapter_errors(h, expected, tokens):
    """rel_err of each adapter's rows (an error in a small adapter's rows is not lost in the others')."""
    errors, t0 = [], 0
    for n in tokens:
        if n:
            errors.append(ref.rel_err(h[t0 : t0 + n], expected[t0 : t0 + n]))
        t0 += n
    return errors


@pytest.mark.cuda
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_shrink_with_its_k_split_matches_reference(case, split_k):
    """A CUDA shrink of few tokens runs its K in chunks (float32 partial sums added by a second
    kernel that also writes the zeros beyond each adapter's rank); of many tokens, or with the split
    off, in one. Each against the float64 oracle, adapter by adapter; a result missing x's last chunk
    (the kernel run with those columns zeroed) fails the same comparison."""
    tokens, ranks, d = case
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    seg = Segments.build(tokens, ranks, device="cuda")
    splits = alto_ext._C.shrink_splits(seg.num_tokens, len(tokens), seg.h_width, d, sms)
    assert (splits > 1) == (split_k and seg.num_tokens < 1000), splits
    for dtype in (torch.bfloat16, torch.float16):
        for scaled in (True, False):
            seg, x, A, _ = make_case(tokens, ranks, d, 8, "cuda", dtype, scaled)
            args = (A, seg.seg_indptr, seg.rank_indptr, seg.h_width, seg.scaling)
            h = alto_ext.lora_shrink(x, *args)
            expected = ref.shrink(x.cpu(), A.cpu(), seg, seg.h_width)
            assert max(adapter_errors(h, expected, tokens)) < TOL[dtype]
            t0 = 0
            for n, r in zip(tokens, ranks):  # exactly zero beyond each adapter's rank
                assert not h[t0 : t0 + n, r:].any()
                t0 += n
            short = x.clone()
            short[:, -512:] = 0
            assert max(adapter_errors(alto_ext.lora_shrink(short, *args), expected, tokens)) > 10 * TOL[dtype]
