"""The loss of a co-located step: alto.loss.token_losses (blocked fp32 cross-entropy) vs the usual
`F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ...)` of HF / PEFT training loops.

Both get the same bf16 logits [rows, seq, vocab] (what the LM head gives; they exist before the
loss either way) and compute every token's loss and the gradient of their sum w.r.t. the logits.
Timed: forward + backward, median of --iters after warm-up (CUDA events). Memory: the peak
allocated above the logits and labels during forward + backward (GiB), i.e. what the loss costs.

--head compares the LM head + loss instead: from the last hidden states [T, d] (bf16) and the frozen
head weight [V, d], the unfused way (the bf16 logits matmul, then token_losses), liger-kernel's fused
linear cross-entropy (reduction "none": per-token losses, never the whole logits; its backward
recomputes them in chunks) and ALTO's fused head (alto.loss.fused_head_losses: a frozen head's
gradient computed in the forward, one chunk of logits at a time), all giving per-token losses whose
per-adapter means a step needs; gradient of their sum w.r.t. the hidden states. ALTO's losses and
gradients are checked against liger's.
Run on the GPU: python bench/bench_loss.py [--head]
(a CPU smoke run, wall clock and no peak memory: --device cpu --tokens 64 --seq 16 --vocab 300 --iters 1)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from alto.loss import fused_head_losses, token_losses


def usual(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def ours(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_losses(logits, labels).sum()


def elapsed_ms(fn, device: torch.device) -> float:
    """One call of fn: CUDA events on the GPU, the wall clock on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def measure(loss_fn, logits: torch.Tensor, labels: torch.Tensor, iters: int) -> tuple[float, float, float]:
    """(median ms, peak GiB above the inputs, loss value)."""
    def once():
        logits.grad = None
        loss = loss_fn(logits, labels)
        loss.backward()
        return loss

    once()  # warm-up
    times = [elapsed_ms(once, logits.device) for _ in range(iters)]
    logits.grad = None
    if logits.device.type != "cuda":  # no allocator statistics
        return statistics.median(times), float("nan"), once().item()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    value = once().item()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    logits.grad = None
    return statistics.median(times), peak, value


def head_then_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ours: the bf16 logits, then the blocked fp32 per-token loss (targets: the next token at each
    position, the last one -100; token_losses shifts labels, so they go in one place later)."""
    logits = hidden @ weight.T
    return token_losses(logits[None], F.pad(targets[:-1], (1, 0), value=-100)[None])[0]


def liger_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")


def compare_heads(args) -> None:
    import importlib.metadata as md

    print(f"liger-kernel {md.version('liger-kernel')}, triton {md.version('triton')}; hidden {args.hidden}, bf16\n")
    print("tokens | vocab | unfused ms | liger ms | ALTO ms | ALTO vs liger | unfused peak GiB | liger peak GiB | "
          "ALTO peak GiB | max loss diff | max grad diff")
    print("--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
    for tokens in args.tokens:
        for vocab in args.vocab:
            torch.manual_seed(0)
            hidden = torch.randn(tokens, args.hidden, device="cuda").bfloat16().requires_grad_()
            weight = (torch.randn(vocab, args.hidden, device="cuda") / args.hidden**0.5).bfloat16()
            targets = torch.randint(0, vocab, (tokens,), device="cuda")
            targets[::7] = -100  # sequence ends: no target
            targets[-1] = -100
            heads = {"unfused": lambda h, t, w=weight: head_then_loss(h, w, t),
                     "liger": lambda h, t, w=weight: liger_head_loss(h, w, t),
                     "ALTO": lambda h, t, w=weight: fused_head_losses(h, w, None, t)}
            times, peaks, losses, grads = {}, {}, {}, {}
            for name, fn in heads.items():
                times[name], peaks[name], _ = measure(lambda h, t, f=fn: f(h, t).sum(), hidden, targets, args.iters)
                hidden.grad = None
                losses[name] = fn(hidden, targets).float()
                losses[name].sum().backward()
                grads[name], hidden.grad = hidden.grad, None
            loss_diff = (losses["ALTO"] - losses["liger"]).abs().max()
            grad_diff = (grads["ALTO"].float() - grads["liger"].float()).abs().max()
            print(f"{tokens} | {vocab} | {times['unfused']:.1f} | {times['liger']:.1f} | {times['ALTO']:.1f} | "
                  f"{times['liger'] / times['ALTO']:.2f}x | {peaks['unfused']:.1f} | {peaks['liger']:.1f} | "
                  f"{peaks['ALTO']:.1f} | {loss_diff:.1e} | {grad_diff:.1e}")
            del hidden, weight, targets, losses, grads, heads
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768], help="tokens per step (rows x seq)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256], help="SmolLM2, Llama 3")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--head", action="store_true", help="LM head + loss: unfused, liger-kernel's fused kernel and ALTO's")
    ap.add_argument("--hidden", type=int, default=2048, help="--head: hidden size (Llama-3.2-1B)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    if args.head and args.device != "cuda":
        ap.error("--head needs --device cuda (liger-kernel's kernels are Triton GPU kernels)")
    if args.head:
        compare_heads(args)
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {where}  torch {torch.__version__}; bf16 logits, {args.seq} tokens/row\n")
    print("tokens | vocab | logits GiB | usual ms | ours ms | speed-up | usual peak GiB | ours peak GiB | loss rel. diff")
    print("--- | --- | --- | --- | --- | --- | --- | --- | ---")
    for tokens in args.tokens:
        for vocab in args.vocab:
            torch.manual_seed(0)
            rows = tokens // args.seq
            logits = (3 * torch.randn(rows, args.seq, vocab, device=args.device)).bfloat16().requires_grad_()
            labels = torch.randint(0, vocab, (rows, args.seq), device=args.device)
            labels[:, -args.seq // 8 :] = -100  # some padding
            u_ms, u_peak, u_loss = measure(usual, logits, labels, args.iters)
            o_ms, o_peak, o_loss = measure(ours, logits, labels, args.iters)
            print(f"{tokens} | {vocab} | {logits.numel() * 2 / 2**30:.1f} | {u_ms:.1f} | {o_ms:.1f} | "
                  f"{u_ms / o_ms:.2f}x | {u_peak:.1f} | {o_peak:.1f} | {abs(o_loss - u_loss) / abs(u_loss):.1e}")
            del logits, labels
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
