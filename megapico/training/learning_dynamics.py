"""pico's learning-dynamics data, captured at step 0 and at every checkpoint (pico-train's
src/checkpointing/learning_dynamics.py, for a tensor-parallel model).

For a fixed batch of train data and of eval data: for attention.v_proj, attention.o_proj and swiglu.w_2 of
every layer, the module output at the last position of each sequence ([batch, out_features]), the weight, and
the weight's gradient of the mean token loss over the whole batch; fp32, keyed `layers.{i}.{suffix}`.

The work runs on a separate fp32 probe model built from the fp32 weights being trained (in a bf16 run: the
ZeRO master weights, not the module's bf16 rounding), so DeepSpeed's gradient hooks and partitions are
untouched and step 0 is pico's initial model exactly. It walks the batch in its own micro batches
(checkpointing.learning_dynamics.micro_batch_size) and copies only the kept rows out of each output, so its
extra memory is the probe (weights + gradients), one micro batch of activations and the [batch, out] rows.
Under TP every tensor is gathered into the full one, the numbers a TP=1 model gives. The TP group of DP
rank 0 computes and global rank 0 writes `learning_dynamics/{train,val}_{activations,weights,gradients}.pt`.
"""

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megapico.model import PicoDecoder, gather_full_tensor
from megapico.parallel.mappings import all_gather_last_dim, group_size

SUFFIXES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")


def fixed_batch(dataset, batch_size: int) -> np.ndarray:  # noqa: ANN001
    """The first batch_size samples (seq_len + 1 tokens each) of a dataset: the same at every step."""
    count = min(batch_size, len(dataset))
    return np.stack([dataset[index] for index in range(count)])


def build_probe(model: PicoDecoder, weights: dict[str, torch.Tensor], device: torch.device | None) -> PicoDecoder:
    """An fp32 PicoDecoder on the same TP group holding `weights` (this rank's shards). Built on the meta
    device: no random init to pay for, and the training RNG is not touched."""
    with torch.device("meta"):
        probe = PicoDecoder(model.config, model.tp_group)
    probe = probe.to_empty(device=device or torch.device("cpu"))
    probe.load_state_dict({key: value.float() for key, value in weights.items()})
    return probe


def capture_learning_dynamics(model: PicoDecoder, samples: np.ndarray, micro_batch_size: int,
                              device: torch.device | None = None, weights: dict[str, torch.Tensor] | None = None
                              ) -> dict[str, dict[str, torch.Tensor]]:
    """{"activations" | "weights" | "gradients": {"layers.{i}.{suffix}": fp32 CPU tensor}}; collective over TP.

    `weights`: this TP rank's fp32 weights to probe (default: the model's own, cast to fp32)."""
    probe = build_probe(model, weights if weights is not None else model.state_dict(), device)
    group = model.tp_group
    names = [f"layers.{i}.{suffix}" for i in range(model.config.n_layers) for suffix in SUFFIXES]
    modules = dict(probe.named_modules())
    full_width = {name: modules[name].weight.shape[0] * (group_size(group) if name.endswith("v_proj") else 1)
                  for name in names}  # v_proj's output is split over TP ranks; o_proj's and w_2's are reduced
    rows = {name: torch.empty(len(samples), full_width[name], device=device) for name in names}
    cursor = [0]  # first row of the current micro batch

    def hook_for(name: str):  # noqa: ANN202
        column_parallel = name.endswith("v_proj")

        def hook(module, inputs, output) -> None:  # noqa: ANN001
            last = output[:, -1, :].detach()
            if column_parallel:
                last = all_gather_last_dim(last, group)
            rows[name][cursor[0]:cursor[0] + len(last)] = last  # a copy: the [b, T, out] output is not kept
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    tokens = torch.from_numpy(np.asarray(samples)).long()
    for start in range(0, len(tokens), micro_batch_size):
        chunk = tokens[start:start + micro_batch_size].to(device)
        cursor[0] = start
        loss = probe(chunk[:, :-1], chunk[:, 1:]) * (len(chunk) / len(tokens))  # mean over the whole batch
        loss.backward()
        del loss
    for handle in handles:
        handle.remove()
    weights_out, gradients = {}, {}
    for name in names:
        param = modules[name].weight
        weights_out[name] = gather_full_tensor(f"{name}.weight", param.detach(), group).float().cpu()
        gradients[name] = gather_full_tensor(f"{name}.weight", param.grad, group).float().cpu()
    return dict(activations={name: kept.cpu() for name, kept in rows.items()}, weights=weights_out,
                gradients=gradients)


def save_learning_dynamics(model: PicoDecoder, weights: dict[str, torch.Tensor] | None,
                           batches: dict[str, np.ndarray], directory: Path, micro_batch_size: int, dp_rank: int,
                           device: torch.device | None = None) -> None:
    """Capture for every split in `batches` ("train", "val") and write the files; call on every rank. `weights`
    (this TP rank's fp32 weights, default the model's own) are read on DP rank 0 only."""
    if dp_rank == 0:
        for split, samples in batches.items():
            states = capture_learning_dynamics(model, samples, micro_batch_size, device, weights)
            if dist.get_rank() == 0:
                directory.mkdir(parents=True, exist_ok=True)
                for kind, tensors in states.items():
                    torch.save(tensors, directory / f"{split}_{kind}.pt")
    dist.barrier()
