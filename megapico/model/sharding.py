"""Where each pico weight is split under tensor parallelism, and the gather / shard functions built on it.

Column-parallel weights (q/k/v, w_0/w_1, both vocab projections) split on dim 0, row-parallel ones
(o_proj, w_2) on dim 1; norms are replicated. Contiguous chunks of q rows are whole query heads and
contiguous chunks of k/v rows whole kv heads, so every rank keeps the GQA pairing h -> h // (H / K)
(that is why TP must divide attention_n_kv_heads).
"""

import torch
import torch.distributed as dist
from torch import nn

from megapico.parallel.mappings import group_size

_PARTITION_DIM_BY_SUFFIX = {
    "embedding_proj.weight": 0,
    "de_embedding_proj.weight": 0,
    "attention.q_proj.weight": 0,
    "attention.k_proj.weight": 0,
    "attention.v_proj.weight": 0,
    "swiglu.w_0.weight": 0,
    "swiglu.w_1.weight": 0,
    "attention.o_proj.weight": 1,
    "swiglu.w_2.weight": 1,
}
_REPLICATED_SUFFIXES = ("attention_norm.weight", "swiglu_norm.weight", "output_norm.weight")


def partition_dim(key: str) -> int | None:
    """The dim a pico state-dict key is split on under TP, or None if replicated."""
    for suffix, dim in _PARTITION_DIM_BY_SUFFIX.items():
        if key == suffix or key.endswith("." + suffix):
            return dim
    if key.endswith(_REPLICATED_SUFFIXES):
        return None
    raise KeyError(f"'{key}' is not a pico-decoder weight")


def shard_state_dict(full: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """The slice of a full pico state dict that TP rank `tp_rank` of `tp_size` holds."""
    shards = {}
    for key, tensor in full.items():
        dim = partition_dim(key)
        if dim is not None and tensor.shape[dim] % tp_size:
            raise ValueError(f"{key} {tuple(tensor.shape)} cannot be split {tp_size} ways on dim {dim}")
        shards[key] = tensor if dim is None else tensor.chunk(tp_size, dim=dim)[tp_rank].clone()
    return shards


def merge_tp_state_dicts(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join the state dicts of TP ranks 0..tp-1 into the full pico state dict."""
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if list(shard) != keys:
            raise ValueError(f"TP shard {rank} has different keys than shard 0")
    merged = {}
    for key in keys:
        dim = partition_dim(key)
        merged[key] = shards[0][key].clone() if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return merged


@torch.no_grad()
def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All-gather a TP-sharded PicoDecoder into the full pico state dict (fp32, CPU) on every TP rank."""
    return {key: gather_full_tensor(key, tensor, model.tp_group).float().cpu()
            for key, tensor in model.state_dict().items()}


def gather_full_tensor(key: str, tensor: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather one pico weight (or a gradient shaped like it) over the TP group."""
    dim = partition_dim(key)
    if dim is None or group_size(tp_group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(group_size(tp_group))]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)
