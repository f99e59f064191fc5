"""Which samples each data-parallel rank reads, in which order, from where training resumed.

Global batch k is samples [k*G, (k+1)*G) of the dataset's (already shuffled) order, whatever the number of
DP ranks: each micro-step takes the next micro_batch x DP samples, and DP rank r reads its contiguous slice.
So the loss curve does not depend on how the batch is spread, and resuming only needs consumed_samples.
"""

from collections.abc import Iterator

import numpy as np
import torch


class PretrainingSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int) -> None:
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} exceeds the dataset's {total_samples} samples")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        first = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(start + first, start + first + self.micro_batch_size))

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)


def collate_samples(samples: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """seq_len + 1 tokens per sample -> (input_ids, labels), each [B, seq_len], int64."""
    tokens = torch.from_numpy(np.stack(samples)).long()
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
