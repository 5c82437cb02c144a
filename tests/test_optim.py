"""MultiAdamW = torch.optim.AdamW + clip_grad_norm_ run separately for every adapter."""
import math

import pytest
import torch

from alto.optim import MultiAdamW

HP = {"a": (1e-3, 0.0, 1.0), "b": (3e-2, 0.1, None), "c": (5e-4, 0.01, 1e-3)}  # lr, wd, max norm


def norms_of(tensors):
    """Each adapter's gradient norm as clip_grad_norm_ computes it (what MultiLoraModel.grad_norms gives)."""
    return torch.stack([torch.nn.utils.get_total_norm([g for g in grads if g is not None])
                        for _, grads in tensors.values()])


def make_params(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in [(3, 5), (7,), (2, 4)]]


# float32: the training path (clip as the fused kernel's grad scale), equal to float32 rounding;
# float64: the exact-math path (clip by a float64 division), equal to float64 rounding.
TOLERANCES = {torch.float32: (1e-6, 1e-7, 1e-5), torch.float64: (1e-12, 1e-14, 1e-12)}  # rtol, atol, norms


@pytest.mark.parametrize("dtype", TOLERANCES)
def test_matches_torch_adamw_and_clipping_per_adapter(dtype):
    rtol, atol, norm_rtol = TOLERANCES[dtype]
    ours = {k: make_params(i, dtype) for i, k in enumerate(HP)}
    theirs = {k: make_params(i, dtype) for i, k in enumerate(HP)}
    opt = MultiAdamW()
    torch_opts = {}
    for k, (lr, wd, _) in HP.items():
        opt.add(k, ours[k], wd)
        torch_opts[k] = torch.optim.AdamW(theirs[k], lr=lr, weight_decay=wd)
    for step in range(5):
        for k in HP:
            g = torch.Generator().manual_seed(100 * step + len(k) + ord(k))
            grads = [torch.randn(p.shape, generator=g, dtype=dtype) * (step + 1) for p in ours[k]]
            for p, q, gr in zip(ours[k], theirs[k], grads):
                p.grad, q.grad = gr.clone(), gr.clone()
        ids = list(HP)
        tensors = {k: ([p.data for p in ours[k]], [p.grad for p in ours[k]]) for k in ids}
        norms = opt.step(tensors, [HP[k][0] for k in ids], [HP[k][2] for k in ids], norms_of(tensors)).tolist()
        for k, norm in zip(ids, norms):
            ref_norm = torch.nn.utils.clip_grad_norm_(theirs[k], HP[k][2] or math.inf)
            assert math.isclose(norm, ref_norm.item(), rel_tol=norm_rtol)
            torch_opts[k].step()
            for p, q in zip(ours[k], theirs[k]):
                assert torch.allclose(p, q, rtol=rtol, atol=atol), (k, step, (p - q).abs().max())


def test_params_without_grad_are_skipped_and_state_is_returned():
    params = make_params(0)
    before = [p.detach().clone() for p in params]
    opt = MultiAdamW()
    opt.add("a", params, 0.1)
    params[0].grad = torch.ones_like(params[0])
    tensors = {"a": ([p.data for p in params], [p.grad for p in params])}
    opt.step(tensors, [1e-2], [None], norms_of(tensors))
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[1], before[1]) and torch.equal(params[2], before[2])
    state = opt.states(["a"])["a"]
    opt.remove(["a"])
    assert state["step"] == 1 and torch.count_nonzero(state["exp_avg"][0]) == params[0].numel()


def test_non_finite_norm_is_reported_and_that_adapter_skipped():
    params = make_params(1)
    opt = MultiAdamW()
    other = make_params(2)
    opt.add("a", params, 0.0)
    opt.add("b", other, 0.0)
    params[0].grad = torch.full_like(params[0], float("inf"))
    for p in other:
        p.grad = torch.ones_like(p)
    tensors = {k: ([p.data for p in ps], [p.grad for p in ps]) for k, ps in (("a", params), ("b", other))}
    before = [p.detach().clone() for p in params + other]
    norms = opt.step(tensors, [1e-2, 1e-2], [1.0, 1.0], norms_of(tensors)).tolist()
    assert not math.isfinite(norms[0]) and math.isfinite(norms[1])
    # a is skipped on the device (no host sync needed): weights, moments and step count unchanged
    assert all(torch.equal(p, q) for p, q in zip(params, before[:3]))
    states = opt.states(["a", "b"])
    assert states["a"]["step"] == 0 and all(torch.count_nonzero(m) == 0 for m in states["a"]["exp_avg"])
    assert not any(torch.equal(p, q) for p, q in zip(other, before[3:])) and states["b"]["step"] == 1


def test_segment_sums_sums_consecutive_runs_including_empty_ones():
    from alto_ext.segments import segment_sums

    values = torch.arange(12, dtype=torch.float64).view(2, 6)
    out = segment_sums(values, [2, 0, 3, 1])
    expected = torch.stack([values[:, 0:2].sum(1), torch.zeros(2, dtype=torch.float64),
                            values[:, 2:5].sum(1), values[:, 5:6].sum(1)], dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(segment_sums(torch.zeros(0), [0, 0]), torch.zeros(2))
