"""torch.distributed for ``torchrun ... -m dopd train``: the process group, each rank's place and device,
and the few collectives the trainer needs. All of it is torch.distributed; there is no communication layer
of ours.

Under torchrun (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set, single node or several) every rank runs the
same trainer. On CUDA the backend is NCCL with rank r on ``cuda:LOCAL_RANK`` (and gloo beside it for the
few CPU tensors: ``"cpu:gloo,cuda:nccl"``); on CPU it is gloo. Every collective waits at most
``--dist-timeout`` seconds. A plain ``dopd train`` creates no process group: :class:`DistContext` ``()`` is
rank 0 of 1, and every collective below is then the identity.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")
#: Rank r samples with seed ``seed + RANK_SEED_STRIDE * r`` (rank 0: the single-process run's seed).
RANK_SEED_STRIDE = 1_000_003
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True when this process is one rank of a torchrun launch (its environment names rank and world)."""
    return all(k in os.environ for k in _TORCHRUN_ENV)


@dataclass(frozen=True)
class DistContext:
    """This process's place among the data-parallel ranks; ``group`` None means a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None

    @classmethod
    def current(cls) -> "DistContext":
        """The default process group's context when one is initialized, else a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), dist.group.WORLD)

    @property
    def enabled(self) -> bool:
        """True when running on a process group (even one of a single rank)."""
        return self.group is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics, logs, the model and the progress bar."""
        return self.rank == 0

    def describe(self) -> str:
        """``rank r of W`` for messages."""
        return f"rank {self.rank} of {self.world_size}"

    def rank_seed(self, seed: int) -> int:
        """This rank's sampling seed (rank 0 keeps ``seed``, so 1 rank reproduces a single process)."""
        return seed + RANK_SEED_STRIDE * self.rank

    # ------------------------------------------------------------ collectives (identity without a group)
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over the ranks (``sum`` or ``max``) and return it."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=self.group)
        return tensor

    def all_gather_objects(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    # ------------------------------------------------------------ dividing work
    def share(self, items: Sequence[T], what: str) -> list[T]:
        """This rank's contiguous equal share of ``items`` (a ValueError naming ``what`` if it does not divide)."""
        n, w = len(items), self.world_size
        if n % w:
            raise ValueError(f"{what}: {n} does not divide over {w} ranks")
        k = n // w
        return list(items[self.rank * k: (self.rank + 1) * k])

    def padded_share(self, items: Sequence[T]) -> tuple[list[T], int]:
        """This rank's contiguous share of ``items`` (ceil(n / W) per rank, the last ones shorter) padded with
        ``items[0]`` to that length, and the number of real items in it. Every rank then makes the same
        number of calls (FSDP2 gathers parameters in each forward); the padding is never scored."""
        per = -(-len(items) // self.world_size)
        mine = list(items[self.rank * per: (self.rank + 1) * per])
        return mine + [items[0]] * (per - len(mine)), len(mine)


def rank_device(requested: str, local_rank: Optional[int]) -> str:
    """The ``--device`` of this rank (``local_rank`` None: a single process, unchanged): under torchrun CUDA
    means ``cuda:LOCAL_RANK``; a ConfigError names bad values."""
    from dopd.config import ConfigError

    if local_rank is None:
        return requested
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested != "cuda":
        raise ConfigError(f"--device {requested}: under torchrun every rank takes cuda:LOCAL_RANK; "
                          "valid: auto, cuda, cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= count:
        raise ConfigError(f"--device cuda: LOCAL_RANK is {local_rank} but this node has {count} CUDA device(s); "
                          f"--nproc_per_node must be at most {count} (or give --device cpu)")
    return f"cuda:{local_rank}"


def init_distributed(device: str, timeout_s: float) -> DistContext:
    """Join the torchrun launch this process belongs to (a single-process context when there is none).

    ``device`` is the ``--device`` flag: CUDA (``auto`` with a GPU, or ``cuda``) takes NCCL on
    ``cuda:LOCAL_RANK``, the CPU gloo. Collectives fail after ``timeout_s`` seconds instead of waiting forever.
    """
    import torch.distributed as dist

    if not launched_by_torchrun():
        return DistContext()
    if dist.is_initialized():
        return DistContext.current()
    where = torch.device(rank_device(device, int(os.environ["LOCAL_RANK"])))
    timeout = datetime.timedelta(seconds=timeout_s)
    if where.type == "cuda":
        torch.cuda.set_device(where)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=where)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return DistContext.current()


def leave_process_group(timeout_s: float = 300.0) -> None:
    """Destroy the default process group together with the other ranks (every rank calls this, after its last
    collective; a failed run just exits).

    A barrier alone is not enough: the rank that finishes it first could close its connections while a peer's
    transport is still completing the barrier's last messages, and gloo then aborts that peer at exit. So each
    rank also counts itself out in the rendezvous store (which is not one of the connections being closed) and
    waits until every rank has: by then all of them are past their last collective.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    world = dist.get_world_size()
    if world > 1:
        store = dist.distributed_c10d._get_default_store()
        if store.add("dopd/leaving", 1) == world:
            store.set("dopd/left", b"1")
        store.wait(["dopd/left"], datetime.timedelta(seconds=timeout_s))
    dist.destroy_process_group()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group together after a successful run (``leave_process_group``)."""
    if ctx.enabled:
        leave_process_group()


def _timed_out(text: str) -> bool:
    return any(s in text for s in ("Timed out", "timed out", "Timeout", "timeout", "Watchdog"))


def is_collective_failure(err: BaseException) -> bool:
    """True for an error raised by a collective (a peer that died or stopped answering, a timeout)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in (
        "gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
        "Broken pipe"))


def failure_message(err: BaseException, ctx: DistContext) -> str:
    """One line saying which rank failed and why; a collective's failure says what it most likely means."""
    text = " ".join(str(err).split()) or type(err).__name__
    if is_collective_failure(err):
        text = re.sub(r"^\[[^\]]*\]\s*", "", text)[:300]  # the library's source-file prefix
        if _timed_out(text):
            return (f"{ctx.describe()}: a collective operation timed out ({text}): another rank stopped answering for "
                    "--dist-timeout seconds (stuck, or gone without closing its connection)")
        return f"{ctx.describe()}: a collective operation failed ({text}): another rank failed first (its error is above)"
    return f"{ctx.describe()}: {type(err).__name__}: {text}"
