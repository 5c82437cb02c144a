"""Moving tensors between ranks as one flat buffer (the adapter-migration path of rank-local
adapter parallelism). The packing and the send/recv run in the compiled extension
(csrc/dist/transfer.cpp) through a torch.distributed process group: NCCL for CUDA tensors, gloo for
CPU tensors. The receiver passes tensors of the same dtypes and shapes as the sender's; a mismatch
raises ValueError naming both layouts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

ops = torch.ops.alto


def pack_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """All tensors' bytes, in order, as one 1-D uint8 tensor on their (common) device."""
    return ops.pack_tensors(list(tensors))


def unpack_tensors(flat: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
    """Copies pack_tensors' bytes back into `outs` (contiguous, same dtypes and shapes), in place."""
    ops.unpack_tensors(flat, list(outs))


def _group_name(group) -> str:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
    return (group or dist.group.WORLD).group_name


def send_tensors(tensors: Sequence[torch.Tensor], dst: int, group=None, tag: int = 0) -> None:
    """Sends the tensors to rank `dst` as one message (blocks until handed to the backend)."""
    ops.send_tensors(list(tensors), _group_name(group), dst, tag)


def recv_tensors(outs: Sequence[torch.Tensor], src: int, group=None, tag: int = 0) -> None:
    """Receives what rank `src` sent with send_tensors into `outs`, in place."""
    ops.recv_tensors(list(outs), _group_name(group), src, tag)


@torch.library.register_fake("alto::pack_tensors")
def _(tensors):
    return tensors[0].new_empty((sum(t.numel() * t.element_size() for t in tensors),), dtype=torch.uint8)


@torch.library.register_fake("alto::unpack_tensors")
def _(flat, outs):
    return None
