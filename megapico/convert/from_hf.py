"""A pico HF checkpoint (e.g. a released pico-decoder) -> a megapico checkpoint at a chosen TP size.

The checkpoint is made the way pretrain.py makes one: TP processes build the DeepSpeed engine, take their
shards of the HF weights (fresh Adam state) and save step_0, so `pretrain.py` with the same run continues
from it (at this or any other TP x DP layout, through the resume reshard).
"""

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megapico.config import MegapicoConfig, ModelConfig
from megapico.convert.checkpoint_reader import CheckpointError
from megapico.convert.received import checked_model_tensors, pico_model_config, save_run_tokenizer
from megapico.parallel import free_port


def read_pico_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A pico HF directory's model and fp32 weights, read as data: pico's config keys only (its auto_map and
    anything else ignored), the safetensors' keys, shapes and dtypes checked against them."""
    hf_dir = Path(hf_dir)
    config_path, weights_path = hf_dir / "config.json", hf_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; {hf_dir} is not a pico HF checkpoint")
    model = pico_model_config(config_path)
    weights = {key.removeprefix("pico_decoder."): value.float()
               for key, value in checked_model_tensors(weights_path, model).items()}
    return model, weights


def _save_rank(rank: int, tp: int, port: int, config: MegapicoConfig, weights: dict[str, torch.Tensor]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(tp))
    from megapico.checkpoint.reshard import load_full_state_into_engine
    from megapico.checkpoint.training_state import save_training_checkpoint
    from megapico.parallel import ParallelState, init_distributed
    from megapico.training.trainer import build_engine

    init_distributed()
    parallel = ParallelState.build(tp)
    engine, _ = build_engine(config, parallel)
    zeros = {key: torch.zeros_like(value) for key, value in weights.items()}
    load_full_state_into_engine(engine, {"weight": weights, "exp_avg": zeros, "exp_avg_sq": zeros, "step": 0},
                                parallel.tp_rank, tp)
    save_training_checkpoint(engine, config, parallel, step=0, consumed_samples=0)
    torch.distributed.destroy_process_group()


def hf_to_megapico(hf_dir: str | Path, config: MegapicoConfig) -> Path:
    """Write runs/{run}/checkpoints/step_0 at config.parallel.tensor_parallel_size; returns its directory."""
    model, weights = read_pico_hf(hf_dir)
    config.model = model
    root = Path(config.checkpointing.runs_dir) / config.checkpointing.run_name / "checkpoints"
    if (root / "latest").exists():
        raise CheckpointError(f"{root}: already holds checkpoints; choose another checkpointing.run_name")
    tp = config.parallel.tensor_parallel_size
    mp.spawn(_save_rank, args=(tp, free_port(), config, weights), nprocs=tp, join=True)
    tokenizer = config.data.tokenizer or (Path(hf_dir) if (Path(hf_dir) / "tokenizer.json").is_file() else None)
    if tokenizer:
        save_run_tokenizer(root.parent, tokenizer)
    return root / "step_0"
