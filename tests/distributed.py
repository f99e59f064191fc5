"""Run a function in N gloo processes (torch.multiprocessing) and collect what rank 0 returns."""

import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megapico.parallel import free_port


def _worker(rank, world_size, port, fn, args, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, result_path)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size, *args, tmp_path):
    """fn(rank, world_size, *args) runs on every rank; rank 0's return value comes back."""
    result_path = os.path.join(tmp_path, f"result_{fn.__name__}.pt")
    mp.spawn(_worker, args=(world_size, free_port(), fn, args, result_path), nprocs=world_size, join=True)
    return torch.load(result_path, weights_only=False)
