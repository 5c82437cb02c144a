"""Rank-local adapter parallelism: one sweep over several GPUs (or CPU processes).

The frozen base model is replicated on every rank (or its decoder layers sharded over them:
shard, below); every adapter lives WHOLE on exactly one rank
(weights, optimizer state, data stream, dropout RNG) and is trained there by that rank's own
co-located steps. Adapter gradients are never all-reduced: the only collectives of a step are a
small gather of every adapter's progress in the step (its loss: the monitor needs all of them) and a broadcast of rank 0's
decisions (stops, admissions, migrations). An adapter that migrates travels as one flat buffer
through the compiled extension (alto_ext.send_tensors / recv_tensors: NCCL for CUDA tensors).

Which adapter goes to which rank is alto.sched.placement's decision (the work per step, balanced:
ranks run in lockstep, so the step time is the busiest rank's).
"""
from __future__ import annotations

import faulthandler
import importlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from multiprocessing import connection
from pathlib import Path
from typing import Any

import torch
from torch import nn

import alto_ext
from alto.base import NF4_BLOCK, NF4_SCALER_BLOCK, is_nf4
from alto.state import AdapterState


class Group:
    """The ranks of a run. The default (one rank, no torch.distributed) makes every collective a
    no-op, so single-GPU runs take the same code path."""

    def __init__(self, rank: int = 0, world: int = 1, objects=None, initialized: bool = False):
        self.rank, self.world, self._objects = rank, world, objects
        self.initialized = initialized  # a torch.distributed process group this Group closes

    @classmethod
    def from_env(cls, device_type: str, process_group: bool = False) -> "Group":
        """Joins the ranks torchrun / alto tune --nproc started (RANK, WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT in the environment): NCCL for CUDA tensors, gloo for CPU tensors and for the
        pickled metric/decision messages (small; they never touch the GPU). One rank alone gets a
        process group (of itself) only with process_group: a sharded base needs one (FSDP2)."""
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and not process_group:
            return cls()
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        # torch.distributed.nn.functional's functions default to `group=dist.group.WORLD`, bound as it is first
        # imported: imported after the init below (transformers imports it as it builds a model), it would hold
        # the default group past destroy_process_group, its gloo threads alive into the interpreter's exit (a rank
        # aborted there: "terminate called without an active exception"). Imported first, it binds None.
        importlib.import_module("torch.distributed.nn")
        if world <= 1:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
            return cls(initialized=True)
        dist.init_process_group(backend)
        objects = dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), objects, initialized=True)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._objects)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's object, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.is_leader else None
        dist.gather_object(obj, out, dst=0, group=self._objects)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._objects)
        return box[0]

    def barrier(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        dist.barrier(group=self._objects)

    def send_state(self, state: AdapterState, dst: int, device: torch.device) -> None:
        alto_ext.send_tensors([t.to(device) for t in state.tensors()], dst)

    def recv_state(self, template: AdapterState, src: int, device: torch.device) -> AdapterState:
        """Receives into buffers shaped like `template` (the adapter's freshly initialized state)."""
        outs = [torch.empty_like(t, device=device) for t in template.tensors()]
        alto_ext.recv_tensors(outs, src)
        outs[-1] = outs[-1].cpu()  # torch keeps generator states on the CPU
        return template.with_tensors(outs)

    def close(self) -> None:
        """Destroys the process groups; with no reference left to them, their threads are joined here,
        not left running while the interpreter exits (where a gloo thread waiting for the GIL aborts it)."""
        if self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._objects, self.initialized = None, False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


THREADS = "threads.json"  # a run's CPU threads per rank, as it started: its resumes use them too


def rank_threads(ranks_here: int) -> int:
    """The CPU threads of each of ranks_here ranks this process starts on one host: its own torch
    thread count (OMP_NUM_THREADS where set, else torch's default for the machine) shared among
    them, at least 1. Stated by the launcher rather than left to each process (Ray starts its
    workers with OMP_NUM_THREADS=1) because CPU float results depend on it: MKL's GEMMs and torch's
    reductions sum in another order on another number of threads."""
    return max(1, torch.get_num_threads() // ranks_here)


def run_threads(run_dir: Path, resume: bool) -> int:
    """The CPU threads a rank of the run in run_dir trains with: on resume, those its run recorded
    when it started (the same numbers as the uninterrupted run, whoever resumes it), else this
    process's (its launcher's rank_threads)."""
    path = run_dir / THREADS
    if not (resume and path.is_file()):  # (a run folder older than the record: this process's)
        return torch.get_num_threads()
    try:
        threads = json.loads(path.read_text())["cpu_threads"]
    except (ValueError, KeyError, TypeError):
        threads = None
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{path}: not a record of alto tune's CPU threads ({{\"cpu_threads\": N}})")
    return threads


def record_threads(run_dir: Path) -> None:
    """This process's thread count, as the run's (written whole: other ranks may read it as it resumes)."""
    tmp = run_dir / f".{THREADS}.tmp"
    tmp.write_text(json.dumps({"cpu_threads": torch.get_num_threads()}))
    os.replace(tmp, run_dir / THREADS)


def oversubscribed(ranks_here: int) -> str | None:
    """A warning when this host's ranks run more CPU threads than it has cores (a run resumed on more
    ranks than it started with keeps its recorded count: the same numbers, slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = torch.get_num_threads() * ranks_here
    if threads <= cores:
        return None
    return (f"note: {ranks_here} rank(s) x {torch.get_num_threads()} CPU threads (the run's recorded count, "
            f"{THREADS}) on {cores} cores: oversubscribed, slower, the same results")


def launch(fn: Callable[..., Any], nproc: int, args: Sequence[Any] = ()) -> list[Any]:
    """Runs fn(*args) in nproc processes on this host as ranks 0..nproc-1 (what torchrun would
    set up), each on its share of this process's CPU threads (rank_threads); returns every rank's
    result, in rank order. A rank that raises stops the others."""
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    if nproc == 1:
        return [fn(*args)]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port, threads = free_port(), rank_threads(nproc)
    procs = [ctx.Process(target=_rank_main, args=(fn, args, rank, nproc, port, threads, results))
             for rank in range(nproc)]
    for p in procs:
        p.start()
    alive = list(procs)
    while alive:
        ended = connection.wait([p.sentinel for p in alive])
        for p in [p for p in alive if p.sentinel in ended]:
            p.join()
            alive.remove(p)
            if p.exitcode != 0:  # the others may wait on the dead rank forever
                for q in alive:
                    q.kill()
                raise RuntimeError(f"rank {procs.index(p)} exited with code {p.exitcode}; its error is above")
    by_rank = dict(results.get() for _ in procs)
    return [by_rank[r] for r in range(nproc)]


def _rank_main(fn, args, rank: int, world: int, port: int, threads: int, results) -> None:
    # A rank that aborts in C++ prints every thread's Python stack (CI saw gloo ranks end with SIGABRT,
    # "terminate called without an active exception", at their interpreter's exit: Group.close's cause).
    faulthandler.enable(all_threads=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    results.put((rank, fn(*args)))


def shard(model: nn.Module, lora: set[nn.Parameter], device: torch.device) -> None:
    """Shards the frozen decoder layers over the ranks of the default process group with PyTorch's
    FSDP2: each layer is its own unit, gathered before its forward and again before its backward and
    freed after each (the next layer prefetched); the decoder is the root unit, so a step that runs
    the decoder alone (the fused head + loss) gathers the same way. Left out: the LoRA packs `lora`
    (every adapter stays whole on the rank that trains it; its gradients are never reduced) and the
    embeddings, final norm and LM head (replicated: the head may be tied to the embeddings, and the
    fused loss reads the head's weight outside any forward). Parameters still on the CPU (a base
    loaded there to be spread over the GPUs) go to `device`, each rank keeping its shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    for path, p in decoder.named_parameters():
        if is_nf4(p) and world == 1:  # torchao's NF4 gather has no one-rank path (measured: it fails)
            raise ValueError("shard_base: true with base.quantize: nf4 needs 2 or more ranks (one rank holds "
                             "the whole base anyway: set shard_base: false)")
        if is_nf4(p) and p.quantization_factor.numel() % world:  # FSDP splits an NF4 weight by its scale blocks
            raise ValueError(f"shard_base: {path}'s NF4 weight has {p.quantization_factor.numel()} blocks of "
                             f"{NF4_BLOCK * NF4_SCALER_BLOCK} values, which {world} ranks cannot share evenly")
    mesh = init_device_mesh(device.type, (world,))
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    replicated = {p for p in decoder.parameters() if id(p) not in in_layers}
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=lora)
    fully_shard(decoder, mesh=mesh, ignored_params=lora | replicated)
    moved: dict[int, torch.Tensor] = {}  # one copy of a tensor two modules share (a head tied to the embeddings)
    for module in model.modules():  # what FSDP left where it was: LoRA packs, replicated weights, buffers
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if not hasattr(t, "to_local") and t.device != device:
                if id(t) not in moved:
                    copy = t.to(device)
                    moved[id(t)] = nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy
                setattr(module, name, moved[id(t)])


def idle_pass(model: nn.Module, backward: bool) -> None:
    """A forward (and backward) of one zero token through the decoder, with no adapter: what a rank
    with nothing to run does so that the sharded layers' gathers, collective over the ranks, still
    meet the other ranks' (their count and order are the same in every pass)."""
    decoder = model.get_decoder()
    dtype = decoder.get_input_embeddings().weight.dtype
    x = torch.zeros(1, 1, model.config.hidden_size, dtype=dtype, device=decoder.get_input_embeddings().weight.device,
                    requires_grad=backward)
    with torch.set_grad_enabled(backward):
        out = decoder(inputs_embeds=x, use_cache=False).last_hidden_state
        if backward:
            out.sum().backward()
