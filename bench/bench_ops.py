"""LoRA forward+backward over G co-located adapters: ALTO's segmented ops vs a per-adapter torch
loop vs torch._grouped_mm padded to the largest rank, against the byte floor.

Every method does the same work per step, for adapter g on its segment of --tokens tokens (default 2048):
  y_g += s_g (x_g A_gᵀ) B_g;  dh_g = s_g dy_g B_gᵀ;  dx_g += dh_g A_g;  dA_g = dh_gᵀ x_g;  dB_g = s_g h_gᵀ dy_g
(the base matmuls are excluded: they are the same for every method). bf16, CUDA events via
triton.testing.do_bench (median after warm-up). Run on the GPU: python bench/bench_ops.py
(a CPU smoke run, wall-clock medians and no CUDA graph: --device cpu --groups 2 --tokens 16 --shapes 64x128)
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import triton.testing

import alto_ext
from alto_ext import Segments

RANK_CYCLE = [8, 16, 32, 64]
DEVICE = torch.device("cuda")  # --device


def timed(fn) -> float:
    if DEVICE.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/ms (read + write), the ceiling of memory-bound code."""
    numel = 1 << 29 if DEVICE.type == "cuda" else 1 << 22  # 1 GiB; 8 MiB on the CPU (a smoke run)
    src = torch.randn(numel, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms


class Problem:
    def __init__(self, G: int, tokens: int, d_in: int, d_out: int):
        ranks = list(itertools.islice(itertools.cycle(RANK_CYCLE), G))
        scaling = [2.0 * 16 / r for r in ranks]  # alpha/r with alpha = 2*16
        self.seg = Segments.build([tokens] * G, ranks, scaling, device=DEVICE)
        T, R = self.seg.num_tokens, self.seg.total_rank
        bf = dict(device=DEVICE, dtype=torch.bfloat16)
        self.x, self.dy = torch.randn(T, d_in, **bf), torch.randn(T, d_out, **bf)
        self.y, self.dx = torch.randn(T, d_out, **bf), torch.randn(T, d_in, **bf)
        self.A = torch.randn(R, d_in, **bf) / d_in**0.5
        self.B = torch.randn(R, d_out, **bf) / 8
        self.G, self.tokens, self.d_in, self.d_out, self.ranks, self.scaling = G, tokens, d_in, d_out, ranks, scaling

    def floor_bytes(self) -> int:
        """Bytes any implementation must move: x, dy read; y, dx read and written; A, B read;
        dA, dB written (bf16)."""
        T, R = self.seg.num_tokens, self.seg.total_rank
        return 2 * (T * self.d_in * 3 + T * self.d_out * 3 + 2 * R * (self.d_in + self.d_out))


def ours(p: Problem):
    s = p.seg
    idx = (s.seg_indptr, s.rank_indptr)
    h = alto_ext.lora_shrink(p.x, p.A, *idx, s.h_width)
    alto_ext.lora_expand_(p.y, h, p.B, *idx, s.scaling)
    dh = alto_ext.lora_shrink(p.dy, p.B, *idx, s.h_width, s.scaling)
    alto_ext.lora_expand_(p.dx, dh, p.A, *idx)
    dA = alto_ext.lora_weight_grad(dh, p.x, *idx, s.total_rank)
    dB = alto_ext.lora_weight_grad(h, p.dy, *idx, s.total_rank, s.scaling)
    return dA, dB


def torch_loop(p: Problem):
    dA, dB = torch.empty_like(p.A), torch.empty_like(p.B)
    t0 = r0 = 0
    for r, sc in zip(p.ranks, p.scaling):
        xs, dys = p.x[t0 : t0 + p.tokens], p.dy[t0 : t0 + p.tokens]
        A, B = p.A[r0 : r0 + r], p.B[r0 : r0 + r]
        h = xs @ A.T
        p.y[t0 : t0 + p.tokens].addmm_(h, B, alpha=sc)
        dh = (dys @ B.T).mul_(sc)
        p.dx[t0 : t0 + p.tokens].addmm_(dh, A)
        torch.mm(dh.T, xs, out=dA[r0 : r0 + r])
        torch.mm(h.T, dys, out=dB[r0 : r0 + r]).mul_(sc)
        t0, r0 = t0 + p.tokens, r0 + r
    return dA, dB


class Padded:
    """The adapters zero-padded to the largest rank, for torch._grouped_mm (scaling folded in B)."""

    def __init__(self, p: Problem):
        rmax = max(p.ranks)
        self.A = torch.zeros(p.G, rmax, p.d_in, device=DEVICE, dtype=torch.bfloat16)
        self.Bs = torch.zeros(p.G, rmax, p.d_out, device=DEVICE, dtype=torch.bfloat16)
        r0 = 0
        for g, (r, sc) in enumerate(zip(p.ranks, p.scaling)):
            self.A[g, :r] = p.A[r0 : r0 + r]
            self.Bs[g, :r] = p.B[r0 : r0 + r] * sc
            r0 += r
        self.offs = torch.arange(1, p.G + 1, device=DEVICE, dtype=torch.int32) * p.tokens


def grouped_mm(p: Problem, q: Padded):
    gm = torch._grouped_mm
    h = gm(p.x, q.A.transpose(1, 2), offs=q.offs)
    p.y += gm(h, q.Bs, offs=q.offs)
    dh = gm(p.dy, q.Bs.transpose(1, 2), offs=q.offs)
    p.dx += gm(dh, q.A, offs=q.offs)
    dA = gm(dh.T, p.x, offs=q.offs)
    dBs = gm(h.T, p.dy, offs=q.offs)
    return dA, dBs


def graphed(fn):
    """fn captured once in a CUDA graph: its GPU time without Python/launch overhead."""
    fn()  # warm up (lazy init, cuBLAS handles) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def check_same_work(p: Problem, q: Padded) -> float:
    """Relative difference of dA, dB between ours and the loop (and gmm_pad's dA)."""
    dA, dB = ours(p)
    lA, lB = torch_loop(p)
    gA, gB = grouped_mm(p, q)
    err = max((dA.float() - lA.float()).norm() / lA.float().norm(),
              (dB.float() - lB.float()).norm() / lB.float().norm()).item()
    r0 = 0
    for g, r in enumerate(p.ranks):
        ga = (gA[g, :r].float() - lA[r0 : r0 + r].float()).norm() / lA[r0 : r0 + r].float().norm()
        err = max(err, ga.item())
        r0 += r
    return err


def breakdown(p: Problem) -> dict[str, float]:
    s, idx = p.seg, (p.seg.seg_indptr, p.seg.rank_indptr)
    h = alto_ext.lora_shrink(p.x, p.A, *idx, s.h_width)
    dh = alto_ext.lora_shrink(p.dy, p.B, *idx, s.h_width, s.scaling)
    return {
        "shrink": timed(lambda: alto_ext.lora_shrink(p.x, p.A, *idx, s.h_width)),
        "expand": timed(lambda: alto_ext.lora_expand_(p.y, h, p.B, *idx, s.scaling)),
        "dh": timed(lambda: alto_ext.lora_shrink(p.dy, p.B, *idx, s.h_width, s.scaling)),
        "dx": timed(lambda: alto_ext.lora_expand_(p.dx, dh, p.A, *idx)),
        "dA": timed(lambda: alto_ext.lora_weight_grad(dh, p.x, *idx, s.total_rank)),
        "dB": timed(lambda: alto_ext.lora_weight_grad(h, p.dy, *idx, s.total_rank, s.scaling)),
    }


def host_us(fn, calls: int = 200) -> float:
    """Host microseconds per call of fn: its dispatch, checks and launches, not the GPU's work (tiny
    shapes, so the GPU keeps up and the launch queue never blocks). Median of 5 rounds of calls."""
    for _ in range(min(calls, 10)):
        fn()
    rounds = []
    for _ in range(5):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def host_table(groups: list[int]) -> None:
    """Host cost of each op as a co-located step calls it (below torch.library's autograd layer, as
    alto_ext.linear's Functions do), beside one torch.mm / torch._grouped_mm launch of the same shape,
    and of a whole projection's forward+backward (multi_lora_linear) beside a plain linear's."""
    from alto_ext.linear import multi_lora_linear

    print("\nhost us per call (16 tokens/adapter, 256x256: the GPU keeps up; what a host-bound step pays):")
    print("G | shrink | expand_ | weight_grad | torch.mm | torch._grouped_mm | linear fwd+bwd | multi_lora_linear fwd+bwd")
    print("--- | --- | --- | --- | --- | --- | --- | ---")
    ops = torch.ops.alto
    calls = 200 if DEVICE.type == "cuda" else 5  # the CPU smoke run: its figures include the CPU's own compute
    for G in groups:
        p = Problem(G, 16, 256, 256)
        q = Padded(p)
        s, idx = p.seg, (p.seg.seg_indptr, p.seg.rank_indptr)
        h = ops.lora_shrink(p.x, p.A, *idx, s.h_width, None)
        with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
            ours_us = [host_us(lambda: ops.lora_shrink(p.x, p.A, *idx, s.h_width, None), calls),
                       host_us(lambda: ops.lora_expand_(p.y, h, p.B, *idx, s.scaling, True), calls),
                       host_us(lambda: ops.lora_weight_grad(h, p.dy, *idx, s.total_rank, s.scaling, None), calls)]
            mm_us = host_us(lambda: torch.mm(p.x, p.A.T), calls)
            gmm_us = host_us(lambda: torch._grouped_mm(p.x, q.A.transpose(1, 2), offs=q.offs), calls)
        W = torch.randn(256, 256, device=DEVICE, dtype=torch.bfloat16)
        x = p.x.detach().requires_grad_()
        A, B = p.A.float().requires_grad_(), p.B.float().requires_grad_()

        def linear():
            torch.nn.functional.linear(x, W).sum().backward()

        def lora():
            multi_lora_linear(x, W, None, A, B, s).sum().backward()

        row = [*ours_us, mm_us, gmm_us, host_us(linear, calls), host_us(lora, calls)]
        print(" | ".join([str(G), *(f"{v:.1f}" for v in row)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048], help="tokens per adapter")
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--host", type=int, nargs="*", metavar="G",
                    help="only the host-cost table (host us per op call), at these adapter counts (default 1 32)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.host is not None:
        host_table(args.host or [1, 32])
        return

    bw = copy_bandwidth()
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"device: {where}  torch {torch.__version__}  "
          f"copy bandwidth {bw / 1e9:.2f} TB/s (read+write)")
    print(f"ranks cycle {RANK_CYCLE}, bf16, fwd+bwd of the LoRA path\n")
    header = ("tokens/adapter", "d_in->d_out", "G", "ours ms", "ours graph ms", "loop ms", "loop graph ms",
              "gmm_pad ms", "floor ms", "vs loop", "graph vs loop graph", "vs gmm", "floor/ours",
              "floor/ours graph", "max rel diff")
    rows, parts = [], []
    for tokens, shape, G in itertools.product(args.tokens, args.shapes, args.groups):
        d_in, d_out = map(int, shape.split("x"))
        p = Problem(G, tokens, d_in, d_out)
        q = Padded(p)
        diff = check_same_work(p, q)
        t_ours, t_loop, t_gmm = timed(lambda: ours(p)), timed(lambda: torch_loop(p)), timed(lambda: grouped_mm(p, q))
        # replayed as CUDA graphs: the GPU's time alone (a few-token op's eager time is its host's)
        cuda = DEVICE.type == "cuda"
        t_ours_graph = timed(graphed(lambda: ours(p))) if cuda else float("nan")
        t_loop_graph = timed(graphed(lambda: torch_loop(p))) if cuda else float("nan")
        t_floor = p.floor_bytes() / bw
        rows.append((tokens, shape, G, t_ours, t_ours_graph, t_loop, t_loop_graph, t_gmm, t_floor, t_loop / t_ours,
                     t_loop_graph / t_ours_graph, t_gmm / t_ours, t_floor / t_ours, t_floor / t_ours_graph, diff))
        parts.append((tokens, shape, G, breakdown(p)))
        del p, q
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()

    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(" | ".join([str(r[0]), r[1], str(r[2]), *(f"{v:.4g}" for v in r[3:9]),
                          *(f"{v:.2f}x" for v in r[9:12]), *(f"{v:.0%}" for v in r[12:14]), f"{r[14]:.1e}"]))
    print("\nours, per op (ms):")
    names = list(parts[0][3])
    print(" | ".join(["tokens/adapter", "d_in->d_out", "G", *names]))
    print(" | ".join("---" for _ in range(len(names) + 3)))
    for tokens, shape, G, b in parts:
        print(" | ".join([str(tokens), shape, str(G), *(f"{b[n]:.4g}" for n in names)]))


if __name__ == "__main__":
    main()
