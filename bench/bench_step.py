"""One co-located training step on a Llama-3-8B-shaped model (random init, real widths): ALTO with
N adapters vs the frozen base forward+backward alone (the same packed layout, autocast, LM head and
loss: alto.step.forward_token_losses with no adapter), vs the same adapters trained one after
another (a per-adapter loop, what one-job-per-adapter does), and vs PEFT with one adapter; ALTO's
step also with every projection alone (alto.projection_stacks off: q, k, v and gate, up unstacked), and
eager (alto.step_graphs off: where the host holds the GPU up, the step is otherwise replayed as a CUDA graph),
against the base step run the same way (a graph where it is host-bound) too.
Held-out passes too: the N adapters' held-out losses of the same sequences in one forward
(alto.evaluation.held_out_means, what an evaluation runs) against the frozen base's forward alone.

Every method processes the same sequences (one per adapter, --seq tokens each). Ranks cycle
8/16/32/64 over all seven projections. Wall-clock per step (host work included: it is what a
user waits for), median of --iters after warm-up; the base's steps (eager and graphed) and ALTO's are timed in
rounds, each once a round in turn (the held-out pass and the base's forward too), so that the overhead columns against
the base and the held-out one compare the same stretch of the GPU's clocks (the eager, apart and alone columns are
timed after them); the loop's step is the sum of each adapter's step trained alone. Host ms: the median time until the step returns, its host work and any wait
inside it (a host-bound step's is near its wall: the GPU waits for the host). Run on the GPU: python bench/bench_step.py
(a CPU smoke run: --device cpu --widths tiny --layers 1 --adapters 2 --seq 16 --iters 1)
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

from alto import projection_stacks, step_graphs
from alto_ext import grouped_terms
from alto.evaluation import evaluating, held_out_means
from alto.families import Llama
from alto.model import MultiLoraModel
from alto.registry import AdapterConfig, Registry
from alto.step import forward_token_losses, pad_batch, prepare_pass, run_pass
from alto.train import DataStream, Trainer
from bench_memory import WIDTHS

RANKS = [8, 16, 32, 64]
# CUDA runtime calls where the host waits for the GPU (.item(), .nonzero(), a pageable copy: --profile counts them)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# GPU kernels by what they do, for --profile's table of kernel time (the first kind whose pattern a kernel's name
# holds): where a co-located step's time beyond the frozen base's goes
KERNEL_KINDS = (
    ("CUTLASS grouped GEMMs (the LoRA ops; the fused base + LoRA GEMMs)", ("cutlass13device_kernel",)),  # (mangled: launched through cutlass::device_kernel)
    ("AdamW (alto)", ("adamw",)),
    ("other alto kernels", ("alto::",)),
    ("cuBLAS GEMMs", ("nvjet", "gemm", "xmma")),
    ("attention (flash)", ("flash",)),
    ("copies and fills", ("Memcpy", "Memset")),
    ("PyTorch elementwise and reductions", ("at::native",)),
)
OTHER_KERNELS = "other (Triton: liger's SwiGLU, RMSNorm, RoPE, cross-entropy)"
NAMES = {"1b": "Llama-3.2-1B", "8b": "Llama-3-8B", "qwen7b": "Qwen2.5-7B", "smollm2": "SmolLM2-135M"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, iters: int, device: torch.device) -> float:
    return timed_ms(fn, iters, device)[0]


def timed_ms(fn, iters: int, device: torch.device) -> tuple[float, float]:
    return paired_ms([fn], iters, device)[0]


def paired_ms(fns, iters: int, device: torch.device) -> list[tuple[float, float]]:
    """Each step's medians of its wall (to the GPU's end) and of its host time (to the step's return: its own work
    and launches, and any wait inside it, e.g. the fused head's .item()); where the two are close the step is
    host-bound: the GPU waits for the host. Several steps are timed in rounds, each once a round in turn, so that
    their medians come from the same stretch of the GPU's clocks and temperature (their ratios are the table's)."""
    for fn in fns:
        for _ in range(2):  # warm-up (a step graph's timed first run, then its capture), each from an idle GPU
            fn()
        synchronize(device)
    walls, hosts = [[] for _ in fns], [[] for _ in fns]
    for _ in range(iters):
        for fn, fn_walls, fn_hosts in zip(fns, walls, hosts):
            t0 = time.perf_counter()
            fn()
            fn_hosts.append((time.perf_counter() - t0) * 1e3)
            synchronize(device)
            fn_walls.append((time.perf_counter() - t0) * 1e3)
    return [(statistics.median(w), statistics.median(h)) for w, h in zip(walls, hosts)]


def build_model(widths: str, layers: int, device: torch.device):
    import transformers

    cfg = transformers.LlamaConfig(**{**WIDTHS[widths], "num_hidden_layers": layers, "max_position_embeddings": 8192,
                                      "rope_theta": 500000.0})  # Llama 3's
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the base's dtype as alto tune loads it
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def configs(n: int) -> list[AdapterConfig]:
    return [AdapterConfig(rank=r, alpha=2 * r, lr=1e-4, micro_batch_size=1, seed=i,
                          target_modules=Llama.names, max_steps=10**6)
            for i, r in zip(range(n), itertools.cycle(RANKS))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--widths", default="8b", choices=list(WIDTHS), help="the base's widths (bench_memory.WIDTHS)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--profile", metavar="DIR", nargs="?", const="", default=None,
                    help="--profile: print torch.profiler's top ops of one base and one ALTO step at the largest N, "
                         "the host's waits for the GPU in each and their kernel time by kind; "
                         "--profile DIR: instead write Chrome traces of it and of the base step to "
                         "DIR/alto.json and DIR/base.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    kernels: dict[str, dict[str, float]] = {}  # --profile: each profiled step's kernel time by kind

    base = build_model(args.widths, args.layers, device)
    model = MultiLoraModel(base)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, vocab, (args.seq,), generator=gen).tolist() for _ in range(max(args.adapters))]
    # The frozen base gets no parameter grads; make the embeddings' output require grad so that
    # backward runs through every layer, as it must when adapters train.
    base.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())

    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {where}  torch {torch.__version__}; {NAMES.get(args.widths, args.widths)} widths, "
          f"{args.layers} layers, {'bf16' if device.type == 'cuda' else 'fp32'} weights, "
          f"{args.seq} tokens/adapter, ranks {RANKS}, all 7 projections\n")
    rows = []
    for n in args.adapters:
        cfgs = configs(n)

        def base_step():  # the same packed layout, autocast, LM head and loss as a co-located step: only LoRA differs
            token_loss, _, _ = forward_token_losses(model, {}, seqs[:n], 0, device, training=True, packed=True)
            token_loss.sum().backward()

        base_graphs, one = step_graphs.StepGraphs(), torch.ones(1, device=device)

        def base_step_graphed():  # the base step as alto.step_graphs runs a training step (replayed where host-bound)
            step = prepare_pass(model, {}, seqs[:n], 0, device, training=True, packed=True)

            def compute(step, weight):
                loss = run_pass(model, step).sum() * weight[0]
                loss.backward()
                return loss.detach()[None]

            loss = base_graphs.run(model, step, compute, one, []) if device.type == "cuda" else compute(step, one)
            return loss.item()  # as a training step ends, in a read of its losses (StepGraphs times steps that end)

        reg = Registry()
        trainer = Trainer(model, reg, {f"a{i}": DataStream([seqs[i]]) for i in range(n)}, 0, device=device)
        # (resident in the model, the adapters are not in the base steps' plans: each projection runs its base alone,
        # as before they came: MultiLoraLinear.forward's first test)
        trainer.admit([reg.add(f"a{i}", c) for i, c in enumerate(cfgs)])
        graphs, step_graphs.ENABLED = step_graphs.ENABLED, True
        fused = grouped_terms.FUSED_MATMUL
        try:  # ALTO's step replayed as a CUDA graph where the host holds the GPU up; timed in rounds with the base's
            (t_base, h_base), (t_base_graphed, _), (t_ours, h_ours) = paired_ms(
                [base_step, base_step_graphed, trainer.step], args.iters, device)
            base_replayed = bool(base_graphs.graphs)
            base_graphs.clear()
            replayed = bool(trainer.graphs and trainer.graphs.graphs)
            step_graphs.ENABLED = False
            t_eager = wall_ms(trainer.step, args.iters, device)  # no step replayed as a CUDA graph
            # the same with each base GEMM and its adapters' expand as two kernels (alto::lora_matmul's fused
            # GEMM off), replayed where the step is (the switch is part of a graph's key): an A/B within one
            # process, where the base's own step varies by a few ms between processes
            step_graphs.ENABLED, grouped_terms.FUSED_MATMUL = True, False
            t_apart = wall_ms(trainer.step, args.iters, device)
        finally:
            step_graphs.ENABLED, grouped_terms.FUSED_MATMUL = graphs, fused
        (stacked, graphs), projection_stacks.ENABLED, step_graphs.ENABLED = (projection_stacks.ENABLED,
                                                                            step_graphs.ENABLED), False, True
        try:
            t_alone = wall_ms(trainer.step, args.iters, device)  # every projection alone (q, k, v; gate, up)
        finally:
            projection_stacks.ENABLED, step_graphs.ENABLED = stacked, graphs
        if args.profile is not None and n == max(args.adapters):
            kernels["base"] = profile(base_step, args.profile and f"{args.profile}/base.json", device, "base")
            kernels["ALTO"] = profile(trainer.step, args.profile and f"{args.profile}/alto.json", device, "ALTO")

        def base_forward():  # the frozen base's forward alone, as an evaluation runs it (no autocast, no grad)
            with evaluating(model):
                forward_token_losses(model, {}, seqs[:n], 0, device, training=False, packed=True)

        def held_out():  # the adapters' held-out losses, one pass (ends in its one read of the losses)
            held_out_means(model, {a.id: [seqs[i]] for i, a in enumerate(reg)}, 0, device, max_positions=n * args.seq)

        (t_base_fwd, _), (t_eval, _) = paired_ms([base_forward, held_out], args.iters, device)
        if args.profile is not None and n == max(args.adapters):
            profile(base_forward, args.profile and f"{args.profile}/base_forward.json", device, "base forward")
            profile(held_out, args.profile and f"{args.profile}/held_out.json", device, "held-out")
        trainer.retire([(a, a.status, None) for a in reg])

        # One job per adapter: the model holds only the adapter being trained.
        reg = Registry()
        trainer = Trainer(model, reg, {f"l{i}": DataStream([seqs[i]]) for i in range(n)}, 0, device=device)
        t_loop = 0.0
        for i, c in enumerate(cfgs):
            adapter = reg.add(f"l{i}", c)
            trainer.admit([adapter])
            t_loop += wall_ms(trainer.step, args.iters, device)
            trainer.retire([(adapter, adapter.status, None)])
        rows.append((n, t_base, t_ours, replayed, t_eager, t_apart, t_base_graphed, base_replayed, t_alone, t_loop, h_base,
                     h_ours, t_base_fwd, t_eval))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    t_peft = peft_step_ms(base, seqs[0], args.iters, device)
    # The overhead is against the base's faster run, eager or as alto.step_graphs runs it: at one adapter ALTO's
    # step is replayed as a CUDA graph and the eager base is host-bound, so against the eager base alone the
    # graph's gain would pass for the adapters' cost being negative.
    print("adapters | base fwd+bwd ms | ALTO step ms | overhead vs base (its faster run) | CUDA graph | ALTO eager ms | overhead eager "
          "| GEMM and expand apart ms | fused vs apart "
          "| base graphed ms (its graph) | ALTO vs base graphed | projections alone ms | overhead alone "
          "| per-adapter loop ms | ALTO vs loop | base host ms | ALTO host ms "
          "| base forward ms | held-out pass ms | held-out vs base forward | held-out tokens/s")
    print(" | ".join(["---"] * 21))
    for n, tb, to, replayed, tg, tp, tbg, base_replayed, ta, tl, hb, ho, tf, te in rows:
        print(f"{n} | {tb:.1f} | {to:.1f} | {to / min(tb, tbg) - 1:+.1%} | {'replayed' if replayed else 'no'} | {tg:.1f} "
              f"| {tg / tb - 1:+.1%} | {tp:.1f} | {to / tp - 1:+.1%} | {tbg:.1f} ({'replayed' if base_replayed else 'no'}) | {to / tbg - 1:+.1%} "
              f"| {ta:.1f} | {ta / min(tb, tbg) - 1:+.1%} | {tl:.1f} | {tl / to:.2f}x "
              f"| {hb:.1f} | {ho:.1f} | {tf:.1f} | {te:.1f} | {te / tf - 1:+.1%} | {n * args.seq / te * 1e3:,.0f}")
    print(f"\nPEFT, one adapter (rank {RANKS[0]}, all 7 projections), same sequence: {t_peft:.1f} ms/step")
    if "ALTO" in kernels:
        print(f"\nkernel time of one step at {max(args.adapters)} adapters (torch.profiler, GPU events only):")
        print("kernels | base ms | ALTO ms | ALTO - base ms")
        print(" | ".join(["---"] * 4))
        for kind in kernels["ALTO"]:
            b, a = kernels["base"][kind], kernels["ALTO"][kind]
            print(f"{kind} | {b:.2f} | {a:.2f} | {a - b:+.2f}")
        b, a = sum(kernels["base"].values()), sum(kernels["ALTO"].values())
        print(f"all | {b:.2f} | {a:.2f} | {a - b:+.2f}")


def kernel_kind(name: str) -> str:
    """What a GPU kernel (a profile's device event, by name) does: its KERNEL_KINDS entry, else OTHER_KERNELS."""
    return next((kind for kind, patterns in KERNEL_KINDS if any(p in name for p in patterns)), OTHER_KERNELS)


def profile(step, trace: str, device: torch.device, label: str) -> dict[str, float]:
    """Top ops of one step and its host waits, or (a path given) its Chrome trace with Python frames; returns its
    kernel time in ms by kind (kernel_kind; none on the CPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, with_stack=bool(trace)) as prof:
        step()
        synchronize(device)
    averages = prof.key_averages()
    kinds = dict.fromkeys([kind for kind, _ in KERNEL_KINDS] + [OTHER_KERNELS], 0.0)
    for event in averages:  # the device's events only: an op's own entry counts its kernels' time again
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kinds[kernel_kind(event.key)] += event.self_device_time_total / 1e3
    if trace:
        prof.export_chrome_trace(trace)
        return kinds
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if device.type == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    # Where the host waits for the GPU (each wait empties the GPU's queue: it idles while the host launches again)
    calls = {e.key: e.count for e in averages}
    print(f"host waits in the {label} step: " + ", ".join(f"{name} {calls.get(name, 0)}" for name in WAITS))
    return kinds


def peft_step_ms(base, seq, iters: int, device: torch.device) -> float:
    """HF PEFT on the base model, our wrappers unwrapped in place (so it runs last)."""
    import peft

    model = base
    # PEFT needs plain nn.Linear projections: unwrap ours in place for this measurement.
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if child.__class__.__name__ == "MultiLoraLinear":
                setattr(module, name, child.base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=RANKS[0], lora_alpha=2 * RANKS[0],
                                                    target_modules=list(Llama.names)))
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, mask, labels = (t.to(device) for t in pad_batch([seq], 0))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = pm(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return wall_ms(step, iters, device)


if __name__ == "__main__":
    main()
