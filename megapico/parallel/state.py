"""Tensor- and data-parallel process groups, handed to modules as arguments (no global state).

Layout: TP ranks are adjacent, rank = dp_rank * tp_size + tp_rank, so a TP group stays inside one node
(8 GPUs) and the slower inter-node links carry only data-parallel (ZeRO) traffic.
`ParallelState` also answers the `mpu` protocol that `deepspeed.initialize(mpu=...)` queries, so ZeRO-2
partitions over the data-parallel group only and counts TP-sharded gradients once in the global norm.
"""

import datetime
import os
import re
import socket
import warnings
from collections.abc import Callable
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


class LaunchError(RuntimeError):
    """The process cannot tell its rank, or the ranks disagree on something they must share; one line."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[007-010,12],cpu1" -> "gpu007" (the padding is kept)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise LaunchError(f"SLURM node list {nodelist!r} has no host name; set MASTER_ADDR")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def launcher_environment(env: dict[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for torch.distributed, from the launcher that
    started this process: torchrun and deepspeed set them; `srun` (SLURM) and `mpirun` (Open MPI) set their
    own variables, read here; no launcher at all is a world of one. Other MPI launchers are an error rather
    than a silent world of one per process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env):  # inside an srun step
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        return dict(RANK=env["SLURM_PROCID"], WORLD_SIZE=env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"],
                    LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
                    MASTER_ADDR=env.get("MASTER_ADDR") or first_host(nodelist),
                    MASTER_PORT=env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if "OMPI_COMM_WORLD_RANK" in env:
        if "MASTER_ADDR" not in env:
            raise LaunchError("Open MPI sets no rendezvous address: export MASTER_ADDR=<first host> (and MASTER_PORT) "
                              "to every rank, e.g. mpirun -x MASTER_ADDR=node-a -x MASTER_PORT=29500")
        return dict(RANK=env["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=env["OMPI_COMM_WORLD_SIZE"],
                    LOCAL_RANK=env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"), MASTER_ADDR=env["MASTER_ADDR"],
                    MASTER_PORT=env.get("MASTER_PORT", "29500"))
    foreign = [name for name in ("PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK") if name in env]
    if foreign or ("WORLD_SIZE" in env) != ("RANK" in env):
        found = foreign[0] if foreign else ("RANK" if "RANK" in env else "WORLD_SIZE")
        raise LaunchError(f"{found} is set but RANK/WORLD_SIZE are not both set: megapico reads torchrun/deepspeed, "
                          f"SLURM (srun) and Open MPI variables; launch with one of those, or export RANK, "
                          f"WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    return dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def init_distributed(timeout_minutes: int = 30, before_rendezvous: Callable[[int], None] | None = None) -> None:
    """Join the default process group with the launcher's rank and world (see launcher_environment); a plain
    `python` run becomes a world of one (DeepSpeed would otherwise go looking for MPI). `before_rendezvous(rank)`
    runs on every rank first, with no process group yet: a check each rank makes alone (the run directory's lock)
    that must come before the rendezvous, since the same command given twice meets the first launch's port there.
    A rendezvous port that something else listens on is a LaunchError naming it and how to pick another."""
    if dist.is_initialized():
        return
    # DeepSpeed's ZeRO calls torch's all_gather_into_tensor, which torch 2.13 deprecates with a FutureWarning on
    # every rank and every run; megapico's own code calls all_gather_single. Silence exactly that message.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    os.environ.update(launcher_environment(dict(os.environ)))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    if before_rendezvous is not None:
        before_rendezvous(int(os.environ["RANK"]))
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    try:  # device_id binds NCCL to this rank's GPU up front (barriers then need not guess it, and say so every run)
        dist.init_process_group(default_backend(), timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device)
    except dist.DistNetworkError as err:
        if "EADDRINUSE" not in str(err):
            raise
        raise LaunchError(f"the rendezvous port {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} is taken (by "
                          f"another run, or another program); pick a free one: deepspeed --master_port N, torchrun "
                          f"--master-port N, or MASTER_PORT=N for srun and mpirun") from None


def agree_across_ranks(what: str, value: str) -> None:
    """Every rank states `value` (one small all-gather); if any differ, every rank raises the same LaunchError,
    so none is left waiting in a collective the others never reach."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    values: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        other = next(rank for rank, seen in enumerate(values) if seen != values[0])
        raise LaunchError(f"ranks disagree on {what}: rank 0 has {values[0]}, rank {other} has {values[other]}")


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
