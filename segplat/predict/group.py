"""The processes of a prediction launch and the gloo group of their own that shares scenes and counts."""


from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from segplat.errors import SegplatError

log = logging.getLogger("segplat")


class Workers:
    """The processes of a launch (torchrun, accelerate launch, srun), or this one alone.

    A gloo group of its own with a long timeout carries the scene list out and the counts back: a process that
    finishes its share early may wait hours for the others, far past the default group's timeout.
    """

    def __init__(self, timeout: float) -> None:
        from segplat.utils.dist import global_rank, init_distributed, world_size

        self.group = None
        self.rank, self.world = global_rank(), world_size()
        if init_distributed() is not None:
            import torch.distributed as dist

            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=float(timeout)))

    def share(self, build: Any) -> Any:
        """`build()` on rank 0, its result (or its error, raised again) on every rank."""
        if self.group is None:
            return build()
        import torch.distributed as dist

        payload: list[Any] = [None]
        if self.rank == 0:
            try:
                payload = [("ok", build())]
            except SegplatError as err:
                payload = [("error", (type(err), str(err)))]
                dist.broadcast_object_list(payload, src=0, group=self.group)
                raise
            except BaseException:
                dist.broadcast_object_list([("error", (RuntimeError, "rank 0 failed listing the scenes; see its "
                                                       "log."))], src=0, group=self.group)
                raise
        dist.broadcast_object_list(payload, src=0, group=self.group)
        status, value = payload[0]
        if status == "error":
            kind, message = value
            raise kind(message)
        return value

    def gather(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order, on every rank (after all have finished)."""
        if self.group is None:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out
