"""Read a DeepSpeed ZeRO-1/2 checkpoint of any TP x DP layout into full (unsharded) tensors, and write full
tensors into a live engine of another layout.

DeepSpeed's ZeRO files hold, per TP rank and DP rank, a flat fp32 partition of each param group and the
matching flat Adam moments (one "parameter" per group in the base optimizer's state dict). Concatenating the
DP partitions of a TP rank and cutting them by the saved param_shapes gives that TP rank's tensors;
megapico.model's TP merge joins the TP ranks. Loading reverses it: shard for the new TP rank, flatten in
the engine's group order, keep the new DP rank's partition.
"""

from pathlib import Path

import torch

from megapico.checkpoint.files import read_checkpoint_file
from megapico.model import merge_tp_state_dicts, shard_state_dict

MOMENTS = ("exp_avg", "exp_avg_sq")


def zero_shard_path(directory: Path, dp_rank: int, tp_rank: int, bf16: bool) -> Path:
    """DeepSpeed's name for a ZeRO partition file (bf16 runs prefix it with bf16_)."""
    return directory / f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"


def _adam_states(shard: dict) -> list[dict]:
    """Per param group {step, exp_avg, exp_avg_sq}, from either ZeRO save format (rigid or elastic). Before
    the first optimizer step Adam has no state yet: zero moments at step 0."""
    partitions = shard["single_partition_of_fp32_groups"]
    state = shard["base_optimizer_state"]
    if isinstance(state, dict):  # rigid: a torch optimizer state_dict, one flat "parameter" per group
        state = [state["state"].get(index) for index in range(len(partitions))]
    return [group_state or {"step": 0, **{moment: torch.zeros_like(partition) for moment in MOMENTS}}
            for group_state, partition in zip(state, partitions, strict=True)]


@torch.no_grad()
def read_full_state(directory: str | Path, tp_size: int, dp_size: int, bf16: bool,
                    model_states_of_tp_rank_0: dict | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{"weight" | "exp_avg" | "exp_avg_sq": full pico state dict} and {"step": ...} from a checkpoint dir.
    `model_states_of_tp_rank_0`: mp_rank_00_model_states.pt when the caller has read it already (it holds the
    whole bf16 module of a pico-train run: 1.1 GB for large, not worth reading twice)."""
    directory = Path(directory)
    per_tp: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in ("weight", *MOMENTS)}
    steps = set()
    for tp_rank in range(tp_size):
        model_states = (model_states_of_tp_rank_0 if tp_rank == 0 and model_states_of_tp_rank_0 is not None
                        else read_checkpoint_file(directory / f"mp_rank_{tp_rank:02d}_model_states.pt"))
        shards = [read_checkpoint_file(zero_shard_path(directory, dp, tp_rank, bf16))["optimizer_state_dict"]
                  for dp in range(dp_size)]
        adam = [_adam_states(shard) for shard in shards]
        tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in per_tp}
        for group, shapes in enumerate(model_states["param_shapes"]):
            flats = {"weight": torch.cat([s["single_partition_of_fp32_groups"][group] for s in shards])}
            for moment in MOMENTS:
                flats[moment] = torch.cat([states[group][moment] for states in adam])
            steps.update(int(states[group]["step"]) for states in adam)
            offset = 0
            for name, shape in shapes.items():
                numel = shape.numel()
                for kind, flat in flats.items():
                    tensors[kind][name] = flat[offset:offset + numel].view(shape).clone()
                offset += numel
        for kind in per_tp:
            per_tp[kind].append(tensors[kind])
    if len(steps) != 1:
        raise ValueError(f"{directory}: optimizer shards disagree on the step count {sorted(steps)}")
    full = {kind: merge_tp_state_dicts(shards) for kind, shards in per_tp.items()}
    full["step"] = steps.pop()
    return full


def _dp_rank(optimizer) -> int:  # noqa: ANN001
    return torch.distributed.get_rank(group=optimizer.dp_process_group)


@torch.no_grad()
def write_local_state_into_engine(engine, local: dict[str, dict[str, torch.Tensor]],  # noqa: ANN001
                                  step: int | None) -> None:
    """Write this TP rank's tensors into a ZeRO-1/2 engine: always the weights (module copy, in its dtype, and
    this DP rank's slice of the fp32 masters); with a `step`, also the Adam moments in `local`."""
    optimizer = engine.optimizer
    names = {param: name for name, param in engine.module.named_parameters()}
    for param, name in names.items():
        param.copy_(local["weight"][name].to(param.dtype))
    kinds = ("weight",) if step is None else ("weight", *MOMENTS)
    for group, params in enumerate(optimizer.bit16_groups):
        partition = optimizer.single_partition_of_fp32_groups[group]
        targets = {"weight": partition}
        if step is not None:
            state = optimizer.optimizer.state[partition]  # empty until the first step: Adam creates it lazily
            for moment in MOMENTS:
                targets[moment] = state.setdefault(moment, torch.zeros_like(partition))
            # where torch.optim.AdamW keeps it: beside the parameters for the fused (and capturable) kernels, which
            # read it on the device, else on the CPU
            options = optimizer.optimizer.param_groups[group]
            beside = options.get("fused") or options.get("capturable")
            state["step"] = torch.tensor(float(step), dtype=torch.float32,
                                         device=partition.device if beside else "cpu")
        rank = _dp_rank(optimizer)
        for kind in kinds:
            target = targets[kind]
            flat = torch.cat([local[kind][names[p]].reshape(-1).to(target.device, torch.float32) for p in params])
            flat = torch.nn.functional.pad(flat, (0, target.numel() * optimizer.partition_count[group] - flat.numel()))
            target.copy_(flat[rank * target.numel():(rank + 1) * target.numel()])


def load_full_state_into_engine(engine, full: dict, tp_rank: int, tp_size: int) -> None:  # noqa: ANN001
    """Write full weights and Adam moments into a ZeRO-1/2 engine at any TP x DP layout."""
    local = {kind: shard_state_dict(full[kind], tp_rank, tp_size) for kind in ("weight", *MOMENTS)}
    write_local_state_into_engine(engine, local, full["step"])


@torch.no_grad()
def gather_master_weights(engine) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """This TP rank's fp32 master weights, all-gathered from the ZeRO partitions of its DP group onto every DP rank
    (each then holds one fp32 copy of its TP shard, as the learning-dynamics capture, split over DP, needs). In a
    bf16 run these are the weights being trained; the module holds only their bf16 rounding. The weights are
    views of one flat buffer per parameter group."""
    optimizer = engine.optimizer
    group = optimizer.dp_process_group
    names = {param: name for name, param in engine.module.named_parameters()}
    weights = {}
    for index, params in enumerate(optimizer.bit16_groups):
        partition = optimizer.single_partition_of_fp32_groups[index]
        count = optimizer.partition_count[index]
        flat = torch.empty(partition.numel() * count, dtype=partition.dtype, device=partition.device)
        torch.distributed.all_gather(list(flat.chunk(count)), partition, group=group)
        offset = 0
        for param in params:
            weights[names[param]] = flat[offset:offset + param.numel()].view(param.shape)
            offset += param.numel()
    return weights
