"""pico-decoder on tensor-parallel layers, and the TP split of its weights."""

from megapico.model.pico_decoder import PicoDecoder
from megapico.model.sharding import (
    gather_full_state_dict,
    gather_full_tensor,
    merge_tp_state_dicts,
    partition_dim,
    shard_state_dict,
)

__all__ = ["PicoDecoder", "gather_full_state_dict", "gather_full_tensor", "merge_tp_state_dicts", "partition_dim",
           "shard_state_dict"]
