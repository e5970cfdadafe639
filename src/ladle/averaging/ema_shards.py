"""An EMA of a sharded model: each rank averages its own shard of every DTensor.

Under FSDP2 (`fully_shard`) or tensor parallelism a model's parameters are
`DTensor`s: each rank holds one shard. The EMA of such a model keeps DTensors
sharded like the model (same mesh, placements, global shape), so nothing is
gathered: the update is the same foreach lerp over the ranks' local shards, and
the average is saved through `torch.distributed.checkpoint` beside the model,
which reshards it on load like the model.

`EMA(device="cpu")` of a DTensor model keeps each rank's local shard in host
memory (the DTensor's mesh stays the model's), as FSDP2's CPU offload does with
parameters. This module holds the few conversions between a DTensor and its
local shard; `torch.distributed` is imported only when a DTensor already exists.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def _dtensor_class() -> Any:
    # A DTensor can only exist once torch.distributed.tensor is imported: never import it here.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor: Any) -> bool:
    """True for a `torch.distributed.tensor.DTensor` (a sharded or replicated tensor)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the storage it owns, not a copy); a plain tensor as it is."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def wrap_like(like: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """`shard` as this rank's part of a DTensor laid out like the DTensor `like`.

    Built from the spec directly (as FSDP2 does for offloaded parameters): `DTensor.from_local`
    would move a host shard onto the mesh's device.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    spec = DTensorSpec(
        like.device_mesh,  # type: ignore[attr-defined]
        tuple(like.placements),  # type: ignore[attr-defined]
        tensor_meta=TensorMeta(like.shape, like.stride(), shard.dtype),
    )
    return DTensor(shard, spec, requires_grad=False)  # type: ignore[call-arg]


def shard_like(source: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of `source` on `device` in `dtype`; for a DTensor, a DTensor whose local shard is there."""
    if not is_dtensor(source):
        return source.to(device=device, dtype=dtype, copy=True)
    return wrap_like(source, local(source).to(device=device, dtype=dtype, copy=True))


def local_part(weight: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
    """The part of a saved `weight` that fits `shadow`'s local storage.

    A DTensor shadow takes its own shard of a full tensor (sliced locally, no
    communication) or of a DTensor laid out like it; a plain shadow takes the
    whole of a DTensor (gathered: a collective call on every rank).
    """
    if is_dtensor(shadow):
        if is_dtensor(weight):
            same_layout = (weight.placements, weight.device_mesh) == (  # type: ignore[attr-defined]
                shadow.placements,  # type: ignore[attr-defined]
                shadow.device_mesh,  # type: ignore[attr-defined]
            )
            if same_layout:
                return local(weight)
            weight = weight.full_tensor()  # type: ignore[attr-defined]
        from torch.distributed.tensor import distribute_tensor

        spread = distribute_tensor(
            weight,
            shadow.device_mesh,  # type: ignore[attr-defined]
            shadow.placements,  # type: ignore[attr-defined]
            src_data_rank=None,
        )
        return local(spread)
    if is_dtensor(weight):
        return weight.full_tensor()  # type: ignore[attr-defined,no-any-return]
    return weight
