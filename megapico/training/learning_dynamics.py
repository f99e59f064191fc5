"""pico's learning-dynamics data, captured at step 0 and at every checkpoint (pico-train's
src/checkpointing/learning_dynamics.py and the calls in src/training/trainer.py, for a TP x DP model), and every
checkpointing.learning_dynamics.interval steps for the analysis alone (megapico/training/captures.py).

Which sequences (pico-train's meaning): at step_N the train split is the weights of step N and the whole global
batch that step N + 1 trains (G sequences), saved with `train_data/` (HF datasets save_to_disk: input_ids and
decoded text); the val split is every sequence of the learning-dynamics eval set, each at its own length. For
attention.v_proj, attention.o_proj and swiglu.w_2 of every layer: the module output at the last position of each
sequence ([sequences, out_features]), the weight, and the weight's gradient of the mean token loss over the whole
split; fp32, keyed `layers.{i}.{suffix}`. (pico-train's own gradient is the sum of its extraction sub-batches'
mean losses, i.e. ours times the number of sub-batches when they are of equal size; see docs/pico-parity.md.)

The work runs on a separate probe built from the fp32 weights being trained (in a bf16 run: the ZeRO masters), so
DeepSpeed's gradient hooks and partitions are untouched and step 0 is pico's initial model exactly. Its precision
(checkpointing.learning_dynamics.precision; `auto` takes the run's, as pico-train captures with its training
module) is one of PROBE_PRECISIONS: `fp32` (exact, the same numbers on every machine), `bf16-mixed` (fp32 weights
under bf16 autocast: pico-train's one-device bf16-mixed capture) or `bf16` (a bf16 module, weights rounded from
the masters: pico-train's multi-GPU capture in its DeepSpeed bf16 engine). Gradients are summed in fp32 over the
micro batches in every precision; the bf16 ones take about 1/8 of fp32's time on an A100. Only the captured
weights ask for gradients, so the backward skips every other weight gradient (the embedding's, the head's,
q/k_proj's, w_0/w_1's). A capture computes only the kinds its caller reads (of DATA_TYPES, pico-analyze's; a
checkpoint: all three): without gradients the micro batches run the layers forward only, under no_grad (no graph,
no head, no loss, no backward), and weights alone need no pass; each kind's numbers are the same whichever others
are asked for.
The capture is split over the DP ranks: the split's sequences go into micro batches of one length (at most
checkpointing.learning_dynamics.micro_batch_size x the longest sequence in tokens), DP rank r takes micro batches
r, r + DP, ..., one forward/backward at a time, and copies only the kept rows out of each output. The rows and the
gradients are then summed over DP onto DP rank 0 (each row is non-zero on exactly one rank) and, under TP,
gathered into the full tensors there: the numbers a one-process TP=1 model gives. Extra memory per rank: the
probe's weights and captured gradients, one micro batch of activations and the [sequences, out] rows. Global
rank 0 writes `learning_dynamics/{train,val}_{activations,weights,gradients}.pt` (fp32 tensors in every
precision).
"""

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megapico.analysis.spec import DATA_TYPES
from megapico.checkpoint.paths import replacing
from megapico.data.pretokenized_dataset import length_batches
from megapico.data.tokenizer import Tokenizer
from megapico.model import PicoDecoder, gather_full_tensor
from megapico.parallel.mappings import all_gather_last_dim, group_size
from megapico.training.deepspeed_config import BF16_ENGINE

SUFFIXES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
PROBE_PRECISIONS = {"fp32": (torch.float32, False), "bf16-mixed": (torch.float32, True),
                    "bf16": (torch.bfloat16, False)}  # name -> (the probe's dtype, bf16 autocast)


def probe_precision(setting: str, run_precision: str) -> str:
    """checkpointing.learning_dynamics.precision with `auto` resolved from the run's resolved training.precision:
    the capture runs as the training module computes (a bf16 engine's module is bf16)."""
    if setting != "auto":
        return setting
    return "bf16" if run_precision in BF16_ENGINE else run_precision


def next_global_batch(dataset, consumed_samples: int, global_batch: int) -> np.ndarray | None:  # noqa: ANN001
    """The G sequences the next step trains (samples [consumed, consumed + G) of the training order), or None when
    the dataset ends before them (pico-train's final checkpoint has no train split either)."""
    start = consumed_samples
    if start + global_batch > len(dataset):
        return None
    return np.stack([dataset[index] for index in range(start, start + global_batch)])


def first_sequences(dataset, count: int) -> list[np.ndarray]:  # noqa: ANN001
    """The first `count` sequences of a dataset (all of them if it holds fewer), each at its own length."""
    return [np.asarray(dataset[index]) for index in range(min(count, len(dataset)))]


def build_probe(model: PicoDecoder, weights: dict[str, torch.Tensor], device: torch.device | None,
                dtype: torch.dtype = torch.float32) -> PicoDecoder:
    """A PicoDecoder of `dtype` on the same TP group holding `weights` (this rank's shards, rounded once from
    fp32). Built on the meta device: no random init to pay for, and the training RNG is not touched."""
    with torch.device("meta"):
        probe = PicoDecoder(model.config, model.tp_group)
    probe = probe.to_empty(device=device or torch.device("cpu")).to(dtype)
    probe.load_state_dict({key: value.float().to(dtype) for key, value in weights.items()})
    return probe


def _dp_layout(dp_group: ProcessGroup | None) -> tuple[int, int]:
    if dp_group is None:
        return 0, 1
    return dist.get_rank(dp_group), dist.get_world_size(dp_group)


def _passes(probe: PicoDecoder, names: list[str], sequences: Sequence[np.ndarray], micro_batch_size: int,
            device: torch.device | None, dp_group: ProcessGroup | None, autocast: bool, backward: bool,
            ) -> dict[str, dict[str, torch.Tensor]]:
    """This DP rank's micro batches of the split through `probe`: {"activations": [sequences, out] rows, filled on
    the rank that ran each sequence, zero elsewhere} and, with `backward`, {"gradients": the captured weights'
    gradients of the split's mean token loss, this rank's share}. Without `backward` the micro batches run the
    layers alone (the hooked modules are all in them) under no_grad: no graph, no head, no loss."""
    modules = dict(probe.named_modules())
    tp_group = probe.tp_group
    dp_rank, dp_size = _dp_layout(dp_group)
    kept_weights = {modules[name].weight for name in names}
    for parameter in probe.parameters():
        parameter.requires_grad_(backward and parameter in kept_weights)  # no weight gradient that is not kept
    full_width = {name: modules[name].weight.shape[0] * (group_size(tp_group) if name.endswith("v_proj") else 1)
                  for name in names}  # v_proj's output is split over TP ranks; o_proj's and w_2's are reduced
    rows = {name: torch.zeros(len(sequences), full_width[name], device=device) for name in names}
    captured = {"activations": rows}
    if backward:  # fp32 sums over the micro batches (a bf16 .grad would round at every accumulation)
        captured["gradients"] = {name: torch.zeros_like(modules[name].weight, dtype=torch.float32) for name in names}
    lengths = np.array([len(sequence) for sequence in sequences], dtype=np.int64)
    predictions = int((lengths - 1).sum())  # the loss is the mean over every predicted token of the split
    current = [torch.empty(0, dtype=torch.long)]  # indices of the current micro batch's sequences

    def hook_for(name: str):  # noqa: ANN202
        column_parallel = name.endswith("v_proj")

        def hook(module, inputs, output) -> None:  # noqa: ANN001
            last = output[:, -1, :].detach()
            if column_parallel:
                last = all_gather_last_dim(last, tp_group)
            rows[name].index_copy_(0, current[0], last.float())  # a copy: the [b, T, out] output is not kept
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    micro_batches = length_batches(lengths, micro_batch_size * int(lengths.max(initial=1)), equal_lengths=True)
    for indices in micro_batches[dp_rank::dp_size]:
        tokens = torch.from_numpy(np.stack([sequences[i] for i in indices])).long().to(device)
        current[0] = torch.from_numpy(indices).to(device)
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast), \
                torch.set_grad_enabled(backward):
            if not backward:
                probe.hidden_states(tokens[:, :-1])  # the hooks keep the rows; nothing else is needed
                continue
            loss = probe(tokens[:, :-1], tokens[:, 1:]) * (tokens[:, 1:].numel() / predictions)
        loss.backward()
        del loss
        for name in names:
            weight = modules[name].weight
            captured["gradients"][name].add_(weight.grad)
            weight.grad = None
    for handle in handles:
        handle.remove()
    return captured


def capture_learning_dynamics(model: PicoDecoder, sequences: Sequence[np.ndarray], micro_batch_size: int,
                              device: torch.device | None = None, weights: dict[str, torch.Tensor] | None = None,
                              dp_group: ProcessGroup | None = None, precision: str = "fp32",
                              kinds: Collection[str] = DATA_TYPES) -> dict[str, dict[str, torch.Tensor]] | None:
    """{kind: {"layers.{i}.{suffix}": fp32 CPU tensor}} for each of `kinds` (of DATA_TYPES; default all three,
    what a checkpoint stores) on DP rank 0, None on the others; collective over TP and DP. `sequences`: token arrays
    of any lengths >= 2 (inputs + the shifted last label). `weights`: this TP rank's fp32 weights to probe (default:
    the model's own, cast to fp32). `precision`: one of PROBE_PRECISIONS. Only what `kinds` needs runs: forward
    only without gradients, no pass for weights alone."""
    if not set(kinds) <= set(DATA_TYPES):
        raise ValueError(f"learning-dynamics kinds must be among {', '.join(DATA_TYPES)}, got {sorted(kinds)}")
    dtype, autocast = PROBE_PRECISIONS[precision]
    probe = build_probe(model, weights if weights is not None else model.state_dict(), device, dtype)
    modules = dict(probe.named_modules())
    names = [f"layers.{i}.{suffix}" for i in range(model.config.n_layers) for suffix in SUFFIXES]
    captured = {}
    if {"activations", "gradients"} & set(kinds):
        captured = _passes(probe, names, sequences, micro_batch_size, device, dp_group, autocast,
                           backward="gradients" in kinds)
    captured = {kind: tensors for kind, tensors in captured.items() if kind in kinds}
    dp_rank, dp_size = _dp_layout(dp_group)
    if dp_size > 1:  # each row is non-zero on exactly one rank; each gradient is a share of the split's
        root = dist.get_global_rank(dp_group, 0)
        for tensor in (tensor for tensors in captured.values() for tensor in tensors.values()):
            dist.reduce(tensor, dst=root, group=dp_group)
    if dp_rank != 0:
        return None
    tp_group = model.tp_group
    if "weights" in kinds:
        captured["weights"] = {name: modules[name].weight.detach().float() for name in names}
    full = {kind: tensors if kind == "activations" else  # the rows are full already (gathered by the hooks)
            {name: gather_full_tensor(f"{name}.weight", tensor, tp_group) for name, tensor in tensors.items()}
            for kind, tensors in captured.items()}
    return {kind: {name: tensor.cpu() for name, tensor in full[kind].items()} for kind in DATA_TYPES if kind in kinds}


def save_train_data(rows: np.ndarray, tokenizer: Tokenizer | None, directory: Path) -> None:
    """pico-train's `train_data/`: the batch as an HF dataset (input_ids, and text decoded without special tokens
    when the run names its tokenizer), written with save_to_disk."""
    import datasets

    columns = {"input_ids": rows.tolist()}
    if tokenizer is not None:
        columns["text"] = tokenizer.decode_batch(columns["input_ids"])
    datasets.Dataset.from_dict(columns).save_to_disk(str(directory))


Dynamics = dict[str, dict[str, dict[str, torch.Tensor]]]  # {split: {kind: {key: fp32 CPU tensor}}}


def capture_splits(model: PicoDecoder, weights: dict[str, torch.Tensor] | None,
                   splits: dict[str, Sequence[np.ndarray]], micro_batch_size: int,
                   dp_group: ProcessGroup | None = None, device: torch.device | None = None,
                   precision: str = "fp32", kinds: Mapping[str, Collection[str]] | None = None) -> Dynamics | None:
    """Capture every split in `splits` ("train": the next global batch, "val"): {split: capture_learning_dynamics'
    tensors} on DP rank 0, None on the others; call on every rank. `kinds`: {split: the kinds to capture of it}
    (default: every kind of every split, what a checkpoint writes). What a checkpoint writes and what an
    analysis-only capture hands to the analysis are these same tensors."""
    states = {split: capture_learning_dynamics(model, sequences, micro_batch_size, device, weights, dp_group,
                                               precision, DATA_TYPES if kinds is None else kinds[split])
              for split, sequences in splits.items()}
    return None if any(tensors is None for tensors in states.values()) else states


def save_learning_dynamics(model: PicoDecoder, weights: dict[str, torch.Tensor] | None,
                           splits: dict[str, Sequence[np.ndarray]], directory: Path, micro_batch_size: int,
                           dp_group: ProcessGroup | None = None, device: torch.device | None = None,
                           tokenizer: Tokenizer | None = None, precision: str = "fp32") -> Dynamics | None:
    """capture_splits, and global rank 0 writes the files (plus train_data/ for the train split); call on every
    rank. `weights`: this TP rank's fp32 weights (default the model's own); `precision`: the probe's, one of
    PROBE_PRECISIONS. Returns the captured tensors where capture_splits does."""
    states = capture_splits(model, weights, splits, micro_batch_size, dp_group, device, precision)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for split, kinds in states.items():
            for kind, tensors in kinds.items():
                with replacing(directory / f"{split}_{kind}.pt") as tmp:
                    torch.save(tensors, tmp)
            if split == "train":
                save_train_data(np.asarray(splits[split]), tokenizer, directory / "train_data")
    dist.barrier()
    return states
