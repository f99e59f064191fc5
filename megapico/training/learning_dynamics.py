"""pico's learning-dynamics data, captured at step 0 and at every checkpoint (pico-train's
src/checkpointing/learning_dynamics.py, for a tensor-parallel model).

For a fixed batch of train data and of eval data: for attention.v_proj, attention.o_proj and swiglu.w_2 of
every layer, the module output at the last position of each sequence ([batch, out_features]), the weight, and
the weight's gradient of the mean token loss over the whole batch; fp32, keyed `layers.{i}.{suffix}`. Work runs
on a fresh fp32 copy of the model, so DeepSpeed's gradient hooks and partitions are untouched; under TP every
tensor is gathered into the full one, the numbers a TP=1 model gives. The TP group of DP rank 0 computes and
global rank 0 writes `learning_dynamics/{train,val}_{activations,weights,gradients}.pt`.
"""

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megapico.model import PicoDecoder, gather_full_tensor
from megapico.parallel.mappings import all_gather_last_dim

SUFFIXES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")


def fixed_batch(dataset, batch_size: int) -> np.ndarray:  # noqa: ANN001
    """The first batch_size samples (seq_len + 1 tokens each) of a dataset: the same at every step."""
    count = min(batch_size, len(dataset))
    return np.stack([dataset[index] for index in range(count)])


def capture_learning_dynamics(model: PicoDecoder, samples: np.ndarray, micro_batch_size: int,
                              device: torch.device | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{"activations" | "weights" | "gradients": {"layers.{i}.{suffix}": fp32 CPU tensor}}; collective over TP."""
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        probe = PicoDecoder(model.config, model.tp_group).to(device)
    probe.load_state_dict({key: value.float() for key, value in model.state_dict().items()})
    group = model.tp_group
    names = [f"layers.{i}.{suffix}" for i in range(model.config.n_layers) for suffix in SUFFIXES]
    modules = dict(probe.named_modules())
    activations: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook_for(name: str):  # noqa: ANN202
        column_parallel = name.endswith("v_proj")  # its output is split over TP ranks; o_proj/w_2 are reduced

        def hook(module, inputs, output) -> None:  # noqa: ANN001
            last = output[:, -1, :].detach().float()
            activations[name].append(all_gather_last_dim(last, group) if column_parallel else last)
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    tokens = torch.from_numpy(samples).long()
    for start in range(0, len(tokens), micro_batch_size):
        chunk = tokens[start:start + micro_batch_size].to(device)
        loss = probe(chunk[:, :-1], chunk[:, 1:]) * (len(chunk) / len(tokens))  # mean over the whole batch
        loss.backward()
    for handle in handles:
        handle.remove()
    weights, gradients = {}, {}
    for name in names:
        param = modules[name].weight
        weights[name] = gather_full_tensor(f"{name}.weight", param.detach(), group).float().cpu()
        gradients[name] = gather_full_tensor(f"{name}.weight", param.grad, group).float().cpu()
    return dict(activations={name: torch.cat(parts).cpu() for name, parts in activations.items()},
                weights=weights, gradients=gradients)


def save_learning_dynamics(model: PicoDecoder, batches: dict[str, np.ndarray], directory: Path,
                           micro_batch_size: int, dp_rank: int, device: torch.device | None = None) -> None:
    """Capture for every split in `batches` ("train", "val") and write the files; call on every rank."""
    if dp_rank == 0:
        for split, samples in batches.items():
            states = capture_learning_dynamics(model, samples, micro_batch_size, device)
            if dist.get_rank() == 0:
                directory.mkdir(parents=True, exist_ok=True)
                for kind, tensors in states.items():
                    torch.save(tensors, directory / f"{split}_{kind}.pt")
    dist.barrier()
