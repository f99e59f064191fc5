"""Tensor- and data-parallel process groups, handed to modules as arguments (no global state).

Layout: TP ranks are adjacent, rank = dp_rank * tp_size + tp_rank, so a TP group stays inside one node
(8 GPUs) and the slower inter-node links carry only data-parallel (ZeRO) traffic.
`ParallelState` also answers the `mpu` protocol that `deepspeed.initialize(mpu=...)` queries, so ZeRO-2
partitions over the data-parallel group only and counts TP-sharded gradients once in the global norm.
"""

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> None:
    """Join the default process group from torchrun/deepspeed env vars; a plain `python` run becomes
    a world of one (DeepSpeed would otherwise go looking for MPI)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(default_backend(), timeout=datetime.timedelta(minutes=timeout_minutes))


@dataclass(frozen=True)
class ParallelState:
    """This rank's place in the TP x DP grid. Groups are None for a single process."""

    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_group: ProcessGroup | None = None
    dp_group: ProcessGroup | None = None
    dp_group_ranks: tuple[int, ...] = (0,)

    @classmethod
    def build(cls, tp_size: int) -> "ParallelState":
        """Create the TP and DP groups over the initialised default group. Every rank must call this
        with the same tp_size (new_group is collective)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp_size < 1 or world % tp_size:
            raise ValueError(f"world size {world} is not divisible by tensor_parallel_size={tp_size}")
        dp_size = world // tp_size
        tp_group = dp_group = None
        dp_ranks: tuple[int, ...] = ()
        for dp_index in range(dp_size):
            ranks = list(range(dp_index * tp_size, (dp_index + 1) * tp_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                tp_group = group
        for tp_index in range(tp_size):
            ranks = list(range(tp_index, world, tp_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                dp_group, dp_ranks = group, tuple(ranks)
        return cls(tp_size=tp_size, tp_rank=rank % tp_size, dp_size=dp_size, dp_rank=rank // tp_size,
                   tp_group=tp_group, dp_group=dp_group, dp_group_ranks=dp_ranks)

    @property
    def is_first_rank(self) -> bool:
        return self.tp_rank == 0 and self.dp_rank == 0

    # --- the mpu protocol DeepSpeed calls (model parallel == tensor parallel here; no pipeline) ---
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self) -> ProcessGroup | None:
        return self.tp_group

    def get_model_parallel_src_rank(self) -> int:
        return dist.get_rank() - self.tp_rank

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self) -> ProcessGroup | None:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_group_ranks)

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank
