"""token_losses (the blocked fp32 cross-entropy of a co-located step) and head_token_losses (the fused
frozen LM head + cross-entropy on CUDA, alto.loss._FrozenHeadCrossEntropy) against float64 F.cross_entropy, forward and backward, on
fresh random inputs and odd shapes."""
import pytest
import torch
import torch.nn.functional as F

import alto.loss
from alto.loss import (adapter_loss_sums, fused_head_available, fused_head_step_bytes, head_token_losses,
                       mean_losses, token_losses)


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token losses as [B, L] in float64 (0 at the last position and where there is no target)."""
    out = F.cross_entropy(logits[:, :-1].double().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                          reduction="none").view(labels.shape[0], -1)
    return F.pad(out, (0, 1))


# (rows, length, vocab, block elements): one block, blocks that do not divide the rows, a block of
# one row, vocab 1 and 17, one row of two tokens
SHAPES = [(3, 9, 50, 2**28), (4, 7, 33, 5 * 33), (2, 5, 17, 1), (3, 4, 1, 2**28), (1, 2, 40, 2**28)]


@pytest.mark.parametrize("rows,length,vocab,block", SHAPES)
def test_token_losses_match_float64_cross_entropy(device, rows, length, vocab, block, monkeypatch):
    monkeypatch.setattr(alto.loss, "LOSS_BLOCK_ELEMENTS", block)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    labels = torch.randint(0, vocab, (rows, length), device=device)
    labels[0, length // 2 :] = -100  # padding: no target
    logits = (3 * torch.randn(rows, length, vocab, device=device)).to(dtype).requires_grad_()
    ref_logits = logits.detach().double().requires_grad_()
    weights = torch.randn(rows, length, device=device, dtype=torch.float64)

    ours = token_losses(logits, labels)
    ref = reference(ref_logits, labels)
    assert ours.dtype == torch.float32 and ours.shape == labels.shape
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.all(ours[0, length // 2 - 1 :] == 0) and torch.all(ours[:, -1] == 0)

    (ours.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    assert logits.grad.dtype == dtype
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, **tol)
    assert torch.all(logits.grad[0, length // 2 - 1 :] == 0)  # no target: no gradient


def test_mean_losses_are_each_adapters_mean_token_loss():
    logits = torch.randn(5, 6, 11)
    labels = torch.randint(0, 11, (5, 6))
    labels[1, 3:] = -100
    labels[4, 1:] = -100  # a sample with no target at all
    ref = reference(logits, labels)
    counts = (labels[:, 1:] != -100).sum(1)
    got = mean_losses(adapter_loss_sums(token_losses(logits, labels), labels, [2 * 6, 0, 3 * 6]))  # an adapter with no samples
    want = [ref[:2].sum() / counts[:2].sum(), 0.0, ref[2:].sum() / counts[2:].sum()]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("rows,length,hidden,vocab,bias", [(3, 9, 64, 50, False), (2, 33, 48, 1000, True), (1, 2, 16, 7, False)])
def test_fused_head_losses_match_float64(rows, length, hidden, vocab, bias):
    assert fused_head_available(torch.device("cuda")), "liger-kernel must import on a GPU machine"
    head = torch.nn.Linear(hidden, vocab, bias=bias, device="cuda").bfloat16().requires_grad_(False)
    h = torch.randn(rows, length, hidden, device="cuda").bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (rows, length), device="cuda")
    labels[0, length // 2 :] = -100
    ref_h = h.detach().double().requires_grad_()
    ref = reference(F.linear(ref_h, head.weight.double(), None if head.bias is None else head.bias.double()), labels)
    ours = head_token_losses(h, head, labels).view(rows, length)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=2e-2, atol=2e-2)  # bf16 logits
    weights = torch.randn(rows, length, device="cuda", dtype=torch.float64)
    (ours.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=5e-2, atol=2e-2)
    assert torch.all(h.grad[0, length // 2 :] == 0)  # no target: no gradient


@pytest.mark.cuda
def test_fused_head_rows_without_a_target_have_zero_loss_and_gradient():
    """fused_head_losses given rows whose target is -100 (bench_loss passes them; head_token_losses picks
    the target rows first): their loss and gradient are 0, whatever memory the step reuses."""
    rows, hidden, vocab = 70, 32, 500
    h = torch.randn(rows, hidden, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(vocab, hidden, device="cuda") / hidden**0.5).bfloat16()  # logits of a trained head's size
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    targets[::3] = -100
    torch.full((rows,), float("nan"), device="cuda")  # a freed block of NaNs, the size of the losses
    loss = alto.loss.fused_head_losses(h, weight, None, targets)
    ref_h = h.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_h @ weight.double().t(), targets, ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)
    loss.sum().backward()
    ref.sum().backward()
    assert torch.all(loss[::3] == 0) and torch.all(h.grad[::3] == 0)
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=5e-2, atol=2e-2)


@pytest.mark.cuda
def test_a_trainable_head_gets_its_weight_gradient_through_the_unfused_path():
    """The fused head computes no weight gradient (a frozen head has none): a head that trains runs the
    head's logits and the blocked loss instead, and gets float64's weight gradient."""
    hidden, vocab = 32, 300
    head = torch.nn.Linear(hidden, vocab, bias=False, device="cuda")
    h = torch.randn(2, 17, hidden, device="cuda", requires_grad=True)
    labels = torch.randint(0, vocab, (2, 17), device="cuda")
    ref_w = head.weight.detach().double().requires_grad_()
    ref = reference(F.linear(h.detach().double(), ref_w), labels)
    ours = head_token_losses(h, head, labels).view(2, 17)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.weight.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-4)


class HeadGemms(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix products whose output is a chunk of [rows, vocab] logits."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and out.shape[-1] == self.vocab:
            self.rows.append(out.shape[0])
        return out


@pytest.mark.cuda
@pytest.mark.parametrize("chunk_rows", [alto.loss.HEAD_CHUNK_ROWS, 64])
def test_the_fused_head_reads_its_weight_once_per_chunk_in_forward_only_and_matches_float64(chunk_rows, monkeypatch):
    """300 target rows through a head 128x wider than deep: one product of [rows, vocab] logits per
    chunk of HEAD_CHUNK_ROWS rows (one chunk, or five of 64 rows and the rest), all in the forward;
    the backward computes no logits again (liger's reduction "none" does, every chunk). Losses and
    each row's gradient, under its own upstream gradient, as float64's."""
    monkeypatch.setattr(alto.loss, "HEAD_CHUNK_ROWS", chunk_rows)
    rows, length, hidden, vocab = 2, 151, 64, 8192
    head = torch.nn.Linear(hidden, vocab, bias=False, device="cuda").bfloat16().requires_grad_(False)
    h = torch.randn(rows, length, hidden, device="cuda").bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (rows, length), device="cuda")
    targets = rows * (length - 1)
    ref_h = h.detach().double().requires_grad_()
    ref = reference(F.linear(ref_h, head.weight.double()), labels)
    weights = torch.randn(rows, length, device="cuda", dtype=torch.float64)
    with HeadGemms(vocab) as gemms:
        ours = head_token_losses(h, head, labels).view(rows, length)
        forward = list(gemms.rows)
        (ours.double() * weights).sum().backward()
    chunk = min(chunk_rows, targets)
    assert forward == gemms.rows == [min(chunk, targets - i) for i in range(0, targets, chunk)]
    torch.testing.assert_close(ours.double(), ref, rtol=2e-2, atol=2e-2)  # bf16 logits
    (ref * weights).sum().backward()
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=5e-2, atol=2e-2)


def test_the_fused_head_holds_one_chunk_of_logits():
    """The memory model's head term: one [chunk, vocab] buffer of every row up to HEAD_CHUNK_ROWS, then
    that many (its backward holds none)."""
    chunk = alto.loss.HEAD_CHUNK_ROWS
    assert fused_head_step_bytes(0, 2048, 128256, 2) == 0
    assert fused_head_step_bytes(300, 2048, 128256, 2) == 300 * 128256 * 2
    assert fused_head_step_bytes(chunk, 2048, 128256, 2) == fused_head_step_bytes(90000, 2048, 128256, 2) == \
        chunk * 128256 * 2


@pytest.mark.parametrize("rows,length,hidden,vocab", [(3, 9, 24, 50), (1, 2, 8, 7), (4, 5, 16, 33), (1, 3, 8, 7)])
def test_head_losses_run_the_head_on_target_positions_only_and_match_float64(rows, length, hidden, vocab):
    """The unfused path (the CPU's, and float64 checks): the head's logits of the positions with a
    target only, losses equal to float64 cross-entropy of the full logits, forward and backward."""
    torch.manual_seed(rows * length)
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.float64).requires_grad_(False)
    seen = []
    head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    h = torch.randn(rows, length, hidden, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, length))
    labels[0, : length // 2] = -100  # a context-only prompt: no targets there
    if (rows, length) == (1, 3):
        labels[:] = -100  # no target at all: the head sees nothing, every loss and gradient is 0
    ref_h = h.detach().clone().requires_grad_()
    ref = reference(F.linear(ref_h, head.weight), labels)
    ours = head_token_losses(h, head, labels).view(rows, length)
    assert seen == [int((labels[:, 1:] != -100).sum())] or (seen == [] and (labels == -100).all())  # targets alone
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(rows, length, dtype=torch.float64)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(h.grad[:, -1] == 0)  # no target after the last position: no gradient
