"""Rank-local adapter parallelism on the GPUs of one host: the same sweep on 1 GPU and on N GPUs,
and the baseline users run today (DDP over the whole sweep: every rank holds every adapter,
trains 1/N of each adapter's samples, and all-reduces every adapter's gradients each step).

Model: random-init Llama with Llama-3.2-1B widths (real shapes; speed does not depend on the
values), bf16 weights. Sweep: --adapters configs, ranks cycling 8/16/32/64 over all 7
projections, --batch sequences of --seq tokens per adapter per step. Rank-local placement is
alto.sched.placement.place (LPT on alto.sched.placement.adapter_cost, the FLOPs of
alto.sched.estimate); a step = Trainer.step() on every rank plus an all_gather of the step's losses
(alto.sweep_run.SweepRun.run gathers each adapter's progress in the step, its new loss and a few
counters, then broadcasts rank 0's decisions: small messages, not timed here). Timed: wall clock of --iters steps after
--warmup, between barriers. Also reported: the largest relative difference between each
adapter's losses on N GPUs and on 1 GPU over the timed steps (bf16 on CUDA, fp32 on the CPU).
Run: python bench/bench_parallel.py --gpus 2
(a CPU smoke run, gloo ranks: --device cpu --gpus 2 --adapters 2 --layers 1 --hidden 64 --seq 16 --batch 2
--warmup 1 --iters 1)
(--shares-on-one-gpu: each rank's share timed alone on one GPU, the N-GPU step predicted from them.)
"""
from __future__ import annotations

import argparse
import gc
import itertools
import time

import torch

RANKS = [8, 16, 32, 64]


def build(args, rank: int, world: int, mode: str):
    import transformers

    from alto.model import MultiLoraModel
    from alto.sched.placement import adapter_cost, place
    from alto.families import Llama
    from alto.registry import AdapterConfig, Registry
    from alto.sched.catalog import ModelShape
    from alto.train import DataStream, Trainer

    h = args.hidden
    cfg = transformers.LlamaConfig(hidden_size=h, intermediate_size=4 * h, num_attention_heads=h // 64,
                                   num_key_value_heads=max(1, h // 256), num_hidden_layers=args.layers,
                                   vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)  # every rank: the same frozen base
    with torch.device(args.device):
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        base = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    model = MultiLoraModel(base)
    # DDP: each rank trains 1/world of every adapter's samples.
    batch = args.batch // world if mode == "ddp" else args.batch
    configs = {f"a{i:02d}": AdapterConfig(rank=r, alpha=2 * r, lr=1e-4, micro_batch_size=batch, seed=i,
                                          target_modules=Llama.names, max_steps=10**6)
               for i, r in zip(range(args.adapters), itertools.cycle(RANKS))}
    gen = torch.Generator().manual_seed(1)
    streams = {}
    for aid in configs:
        seqs = [torch.randint(1, cfg.vocab_size, (args.seq,), generator=gen).tolist() for _ in range(args.batch * 64)]
        if mode == "ddp":  # rank r takes every world-th sample of the adapter's stream
            seqs = seqs[rank::world]
        streams[aid] = DataStream(seqs)
    reg = Registry()
    for aid, c in configs.items():
        reg.add(aid, c)
    if mode == "ddp":
        mine = list(configs)
    else:
        costs = {a.id: adapter_cost(a, args.seq, ModelShape.from_hf_config(cfg)) for a in reg}
        mine = [aid for aid, r in place(costs, costs, [0.0] * world).items() if r == rank]
    trainer = Trainer(model, reg, streams, 0, device=args.device)
    trainer.admit([reg[aid] for aid in sorted(mine)])
    return trainer, len(mine) * batch * args.seq


def all_reduce_adapter_grads(trainer, world: int) -> None:
    """What DDP does to the adapters: every LoRA gradient summed over ranks (one flat buffer, as
    DDP's buckets coalesce them), then averaged."""
    import torch.distributed as dist

    grads = [p.grad for layer in trainer.model.layers.values() for p in (layer.lora_A, layer.lora_B)
             if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def run_rank(args, mode: str, share: int | None = None) -> dict:
    """One rank of a `mode` run; with `share`, rank `share` of --gpus ranks alone in this process
    (what that rank's GPU computes, without the collectives)."""
    import torch.distributed as dist

    from alto.parallel import Group

    group = Group() if share is not None else Group.from_env(args.device)
    if args.device == "cpu":
        torch.set_num_threads(1)  # one core per rank, as one GPU per rank
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this run's peak only (shares run one after another)
    try:
        trainer, tokens = build(args, *((share, args.gpus) if share is not None else (group.rank, group.world)), mode)
        if mode == "ddp":
            optimizer_step = trainer.optimizer.step

            def synced(*args):  # between backward and the optimizer step, as DDP's hooks do
                all_reduce_adapter_grads(trainer, group.world)
                return optimizer_step(*args)

            trainer.optimizer.step = synced
        losses: dict[str, list[float]] = {}

        def step():
            parts = group.all_gather(trainer.step())  # like SweepRun.run's per-step gather (of progress there)
            for aid in sorted({aid for part in parts for aid in part}):
                # DDP: the mean of the ranks' equal-sized shares is the adapter's loss
                vals = [part[aid] for part in parts if aid in part]
                losses.setdefault(aid, []).append(sum(vals) / len(vals))

        for _ in range(args.warmup):
            step()
        losses.clear()
        sync()
        if group.world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync()
        if group.world > 1:
            dist.barrier()
        ms = (time.perf_counter() - t0) / args.iters * 1e3
        all_tokens = sum(group.all_gather(tokens))
        peak = max(group.all_gather(torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0))
        # every rank past the last gather before any tears its group down (as SweepRun.run: a gloo rank
        # tearing down while another still gathered aborted, "terminate called without an active exception")
        group.barrier()
        return {"ms": ms, "tokens": all_tokens, "losses": losses, "peak_gib": peak}
    finally:
        group.close()


def main() -> None:
    from alto.parallel import launch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2, help="ranks (one GPU each; with --device cpu, one core each)")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (MLP 4x, 64-wide heads); 2048 = Llama-3.2-1B")
    ap.add_argument("--device", default="cuda", help="cuda (NCCL, one GPU per rank) or cpu (gloo: a smoke test)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="sequences per adapter per step")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--shares-on-one-gpu", action="store_true",
                    help="no collectives: time each of the --gpus ranks' shares alone on this one GPU and predict "
                         "the N-GPU step from the busiest (a check before a multi-GPU machine is at hand)")
    args = ap.parse_args()
    if args.batch % args.gpus:
        raise SystemExit(f"--batch={args.batch} must split evenly over --gpus={args.gpus} for the DDP baseline")
    where = f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}" if args.device == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}; hidden {args.hidden} (2048: Llama-3.2-1B widths), "
          f"{args.layers} layers, {'bf16' if args.device == 'cuda' else 'fp32'}; {args.adapters} adapters (ranks {RANKS}, all 7 projections), "
          f"{args.batch} x {args.seq} tokens per adapter per step\n")
    def in_this_process(*run_args):
        result = run_rank(*run_args)
        gc.collect()  # free this process's GPU memory for the next run
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return result

    one = in_this_process(args, "rank-local")
    rows = [("rank-local", 1, one)]
    if args.shares_on_one_gpu:
        shares = [in_this_process(args, "rank-local", r) for r in range(args.gpus)]
        for r, share in enumerate(shares):
            rows.append((f"rank {r}'s share alone", 1, share))
        # Ranks run in lockstep: the busiest share's step is the N-GPU step, collectives aside.
        rows.append(("rank-local, predicted", args.gpus,
                     {"ms": max(x["ms"] for x in shares), "tokens": sum(x["tokens"] for x in shares),
                      "losses": {k: v for x in shares for k, v in x["losses"].items()},
                      "peak_gib": max(x["peak_gib"] for x in shares)}))
    else:
        for mode in ("rank-local", "ddp"):
            rows.append((mode, args.gpus, launch(run_rank, args.gpus, (args, mode))[0]))
    print("method | ranks | step ms | tokens/s | speed-up vs 1 rank | peak GPU GiB/rank | max loss rel. diff vs 1 rank")
    print("--- | --- | --- | --- | --- | --- | ---")
    base_tps = one["tokens"] / one["ms"]
    for mode, gpus, r in rows:
        diff = max(abs(a - b) / abs(b) for aid in r["losses"] for a, b in zip(r["losses"][aid], one["losses"][aid]))
        print(f"{mode} | {gpus} | {r['ms']:.1f} | {r['tokens'] / r['ms'] * 1e3:,.0f} | "
              f"{r['tokens'] / r['ms'] / base_tps:.2f}x | {r['peak_gib']:.1f} | {diff:.1e}")


if __name__ == "__main__":
    main()
