"""The Ray backend of `alto cluster` (alto.backend.Backend): each submission's ranks run as Ray
actors on a placement group of one bundle per GPU. Ray rather than a scheduler of our own: it is
the cluster engine ML teams already run (Ray Train/Tune, KubeRay), and its placement groups
reserve a submission's GPUs atomically, on one node or several, and hand them over as others free
them. The one module that imports ray.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from alto.backend import Poll, RankArgs, RanksDied, RunFailed
from alto.parallel import free_port, rank_threads
from alto.tune import run_rank


@ray.remote(max_concurrency=4)  # run() holds one thread; progress/halt answer meanwhile
class Rank:
    """One rank of one submission, on the GPU (or custom-resource slot) of its placement-group bundle."""

    def __init__(self) -> None:
        self.halting = threading.Event()
        self.progress_now: dict = {}

    def where(self) -> tuple[str, int, int]:
        """(this node's address, a free port there, this process's pid): rank 0's are the
        submission's rendezvous."""
        return ray.util.get_node_ip_address(), free_port(), os.getpid()

    def run(self, args: RankArgs, rank: int, world: int, address: str, port: int) -> int:
        # Ray shows each actor only its own GPUs (CUDA_VISIBLE_DEVICES): its device is cuda:0.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=address,
                          MASTER_PORT=str(port))
        torch.set_num_threads(args.threads)  # the driver's count (Ray sets OMP_NUM_THREADS=1 where it is unset)
        return run_rank(args.text, args.source, args.run_dir, args.resume, None, should_halt=self.halting.is_set,
                        on_step=self.progress_now.update)

    def progress(self) -> dict:
        return dict(self.progress_now)

    def halt(self) -> None:
        self.halting.set()


@dataclass
class Launched:
    """A submission's placement group and ranks; its runs once Ray gave it the GPUs."""

    args: RankArgs
    group: object
    ranks: list
    rendezvous: object  # rank 0's where() while the group waits for its GPUs (None: started)
    runs: list = field(default_factory=list)


class RayBackend:
    """resource: "GPU", or a custom resource of `slots` CPU processes standing in for GPUs;
    address: a running Ray cluster's (default: a Ray started on this machine, stopped at close)."""

    def __init__(self, resource: str = "GPU", address: str | None = None, slots: int | None = None):
        self.resource, self.address, self.slots_asked = resource, address, slots

    def connect(self) -> tuple[int, int]:
        if self.address:
            ray.init(address=self.address, log_to_driver=True)
        elif self.resource == "GPU":
            ray.init(num_gpus=self.slots_asked, include_dashboard=False)
        else:  # CPU processes stand in for GPUs: a custom resource of that many slots
            ray.init(resources={self.resource: self.slots_asked or 1}, include_dashboard=False)
        slots = int(ray.cluster_resources().get(self.resource, 0))
        if slots < 1:
            ray.shutdown()
            raise ValueError(f"the Ray cluster has no {self.resource!r} resource (on a machine without GPUs: "
                             "--resource slot --cluster-gpus N runs tasks as CPU processes)")
        # Every rank gets this process's CPU threads shared among the slots of the fullest node: the same
        # count whatever a submission holds, moved or resumed; on a node of one slot, what alto tune gets here.
        return slots, rank_threads(int(max(n["Resources"].get(self.resource, 0) for n in ray.nodes() if n["Alive"])))

    def launch(self, name: str, world: int, args: RankArgs) -> Launched:
        bundle = {self.resource: 1}
        group = placement_group([bundle] * world, strategy="PACK", name=f"alto-{name}")
        gpu = 1 if self.resource == "GPU" else 0
        ranks = [Rank.options(num_cpus=0, num_gpus=gpu, resources={} if gpu else bundle,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
                 for i in range(world)]
        return Launched(args, group, ranks, ranks[0].where.remote())

    def poll(self, launched: Launched) -> Poll:
        out = Poll()
        try:
            if launched.rendezvous is not None:
                if not ray.wait([launched.rendezvous], timeout=0)[0]:
                    return out
                address, port, _ = ray.get(launched.rendezvous)
                out.pids = [pid for _, _, pid in ray.get([r.where.remote() for r in launched.ranks])]
                world = len(launched.ranks)
                launched.runs = [r.run.remote(launched.args, i, world, address, port) for i, r in enumerate(launched.ranks)]
                launched.rendezvous = None
                return out  # started: the driver records it before anything the next poll may raise
            out.progress = ray.get(launched.ranks[0].progress.remote())
            done, _ = ray.wait(launched.runs, num_returns=len(launched.runs), timeout=0)
            for ref in done:  # a rank that ended in an error raises it now (the others may wait for it forever)
                ray.get(ref)
            if len(done) == len(launched.runs):
                out.codes = ray.get(launched.runs)
        except ray.exceptions.RayTaskError as e:  # an error inside the run
            raise RunFailed(str(e).strip().splitlines()[-1]) from None
        except ray.exceptions.RayError as e:  # a process or node died (killed, out of host memory)
            raise RanksDied(type(e).__name__) from None
        return out

    def halt(self, launched: Launched) -> None:
        launched.ranks[0].halt.remote()

    def release(self, launched: Launched) -> None:
        for r in launched.ranks:
            ray.kill(r)
        remove_placement_group(launched.group)

    def close(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
