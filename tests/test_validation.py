"""Bad input raises a clear error naming the bad argument; nothing is read out of bounds."""
import pytest
import torch

import alto_ext
from alto_ext import Segments


def idx(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def shrink_args(device, dtype, d=16):
    x = torch.randn(7, d, device=device, dtype=dtype)
    A = torch.randn(5, d, device=device, dtype=dtype)
    return x, A


def dtype_for(device):
    return torch.float32 if device.type == "cpu" else torch.bfloat16


BAD_INDICES = [
    # (seg_indptr, rank_indptr, h_width, words the message must contain)
    ([0, 5, 3], [0, 2, 5], 8, ["seg_indptr", "non-decreasing"]),
    ([1, 3, 7], [0, 2, 5], 8, ["seg_indptr[0]", "0"]),
    ([0, 3, 6], [0, 2, 5], 8, ["seg_indptr", "tokens"]),
    ([0, 3, 900], [0, 2, 5], 8, ["seg_indptr"]),
    ([0, 3, 7], [0, 4, 2], 8, ["rank_indptr", "non-decreasing"]),
    ([0, 3, 7], [0, 2, 4], 8, ["rank_indptr", "R"]),
    ([0, 3, 7], [0, 2, 99], 8, ["rank_indptr"]),
    ([0, 3, 7], [0, 1, 5], 2, ["rank", "h_width"]),
]


@pytest.mark.parametrize("seg,rank,width,words", BAD_INDICES)
@pytest.mark.parametrize("d", [16, 2048])  # 2048: a CUDA shrink of 7 tokens splits its K (test_ops)
def test_bad_index_values(device, seg, rank, width, words, d, split_k):
    x, A = shrink_args(device, dtype_for(device), d)
    with pytest.raises(ValueError) as err:
        alto_ext.lora_shrink(x, A, idx(seg, device), idx(rank, device), width)
        alto_ext.check_errors()
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [16, 2048])
def test_bad_indices_leave_their_rows_zero(d, split_k):
    """Without sync checks the op returns; the rows of the adapter whose indices are invalid read
    as zero (nothing read from where they point), the rest as computed, and the error is raised by
    the next check. (Under compute-sanitizer: nothing read or written out of bounds.)"""
    alto_ext.set_sync_checks(False)
    x, A = shrink_args(torch.device("cuda"), torch.bfloat16, d)
    h = alto_ext.lora_shrink(x, A, idx([0, 5, 3], "cuda"), idx([0, 2, 5], "cuda"), 8)
    torch.cuda.synchronize()
    assert not h[5:].any()
    expected = (x[:5].double() @ A[:2].double().T).float()
    assert torch.allclose(h[:5, :2].float(), expected, rtol=2e-2, atol=2e-2) and not h[:5, 2:].any()
    with pytest.raises(ValueError, match="seg_indptr"):
        alto_ext.check_errors()


def test_bad_index_values_other_ops(device):
    dtype = dtype_for(device)
    x, A = shrink_args(device, dtype)
    h = torch.randn(7, 8, device=device, dtype=dtype)
    bad, rank = idx([0, 5, 3], device), idx([0, 2, 5], device)
    with pytest.raises(ValueError, match="seg_indptr"):  # raised by the op (sync checks) or the check after it
        alto_ext.lora_expand_(x.clone(), h, A, bad, rank)
        alto_ext.check_errors()
    with pytest.raises(ValueError, match="seg_indptr"):
        alto_ext.lora_weight_grad(h, x, bad, rank, 5)
        alto_ext.check_errors()


@pytest.mark.parametrize("seg,rank,words", [([0, 5, 3], [0, 2, 5], "seg_indptr"), ([0, 3, 7], [0, 2, 99], "rank_indptr"),
                                            ([0, 3, 7], [0, 1, 5], "h_width")])
@pytest.mark.parametrize("orientation", ["forward", "dx"])
def test_bad_index_values_matmul(device, seg, rank, words, orientation):
    """lora_matmul at a K its fused CUDA kernel takes (64): the error named, nothing read past (sanitizer)."""
    dtype = dtype_for(device)
    a, h, W = (torch.randn(*shape, device=device, dtype=dtype) for shape in ((7, 64), (7, 8), (5, 24)))
    b = torch.randn(24, 64, device=device, dtype=dtype).t() if orientation == "forward" else torch.randn(
        64, 24, device=device, dtype=dtype)
    with pytest.raises(ValueError, match=words):
        alto_ext.lora_matmul(a, b, h[:, :2] if words == "h_width" else h, W, idx(seg, device), idx(rank, device))
        alto_ext.check_errors()


def test_bad_shapes_and_types(device):
    dtype = dtype_for(device)
    x, A = shrink_args(device, dtype)
    seg, rank = idx([0, 3, 7], device), idx([0, 2, 5], device)
    cases = [
        (lambda: alto_ext.lora_shrink(x, A.double(), seg, rank, 8), "W has dtype"),
        (lambda: alto_ext.lora_shrink(x, A[:, :8], seg, rank, 8), "W has 8 columns"),
        (lambda: alto_ext.lora_shrink(x[0], A, seg, rank, 8), "x must be 2-D"),
        (lambda: alto_ext.lora_shrink(x, A, seg.long(), rank, 8), "seg_indptr must be int32"),
        (lambda: alto_ext.lora_shrink(x, A, seg, rank[:2], 8), "rank_indptr has 2 entries"),
        (lambda: alto_ext.lora_shrink(x, A, seg, rank, -1), "h_width must be >= 0"),
        (lambda: alto_ext.lora_shrink(x, A, seg, rank, 8, torch.ones(3, device=device)), "scaling must have shape"),
        (lambda: alto_ext.lora_shrink(x, A, seg, rank, 8, torch.ones(2, device=device, dtype=torch.float64)), "scaling must be float32"),
        (lambda: alto_ext.lora_shrink(x, A, seg[:0], rank[:0], 8), r"G\+1 >= 1"),
        (lambda: alto_ext.lora_expand(x, torch.randn(6, 8, device=device, dtype=dtype), A, seg, rank), "h has 6 rows"),
        (lambda: alto_ext.lora_weight_grad(torch.randn(7, 8, device=device, dtype=dtype), x, seg, rank, -2), "total_rank"),
        (lambda: alto_ext.lora_shrink(x.int(), A.int(), seg, rank, 8), "floating-point"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


@pytest.mark.cuda
def test_device_mismatch_names_argument():
    x = torch.randn(7, 16, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(5, 16, device="cuda", dtype=torch.bfloat16)
    seg, rank = idx([0, 3, 7], "cpu"), idx([0, 2, 5], "cuda")
    with pytest.raises(ValueError, match="seg_indptr is on cpu"):
        alto_ext.lora_shrink(x, A, seg, rank, 8)
    with pytest.raises(ValueError, match="W is on cpu"):
        alto_ext.lora_shrink(x, A.cpu(), seg.cuda(), rank, 8)


@pytest.mark.cuda
def test_deferred_device_error_is_raised_later():
    """Without sync checks a bad index is still caught: at check_errors() or the next op."""
    alto_ext.set_sync_checks(False)
    x, A = shrink_args(torch.device("cuda"), torch.bfloat16)
    h = alto_ext.lora_shrink(x, A, idx([0, 5, 3], "cuda"), idx([0, 2, 5], "cuda"), 8)
    with pytest.raises(ValueError, match="seg_indptr must be non-decreasing"):
        alto_ext.check_errors()
    assert h.shape == (7, 8)
    alto_ext.check_errors()  # cleared: a later good call runs normally


def test_segments_build_errors():
    with pytest.raises(ValueError, match=r"ranks\[1\]"):
        Segments.build([1, 2], [4, -1])
    with pytest.raises(ValueError, match="token_counts has 2 entries but ranks has 1"):
        Segments.build([1, 2], [4])
    with pytest.raises(ValueError, match=r"scaling\[0\] must be finite"):
        Segments.build([1], [4], [float("nan")])
    with pytest.raises(ValueError, match="scaling has 1 entries"):
        Segments.build([1, 2], [4, 4], [1.0])
    with pytest.raises(ValueError, match=r"token_counts\[0\]"):
        Segments.build([1.5], [4])


def test_segments_h_width_is_multiple_of_8():
    assert Segments.build([1, 1], [3, 17]).h_width == 24
    assert Segments.build([1], [8]).h_width == 8
    assert Segments.build([], []).h_width == 0
