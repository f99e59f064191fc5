"""The two training steps the step benchmarks compare: pico-train's own model and the engine pretrain.py builds."""

import argparse
import dataclasses
import importlib.util
import os
import types

import torch

from megapico.config import MODEL_PRESETS, ModelConfig, load_config


def step_arguments(doc: str, micro_batch: int, seq: int, steps: int) -> argparse.ArgumentParser:
    """The shape arguments both step benchmarks take, with each one's defaults."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pico-train", required=True, help="a pico-train checkout (pico-lm/pico-train)")
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--micro-batch", type=int, default=micro_batch)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--steps", type=int, default=steps)
    return parser


def load_pico_train_model(path: str, model_config: ModelConfig) -> torch.nn.Module:
    """pico-train's PicoDecoder (src/model/pico_decoder.py of a pico-train checkout), seeded as pico-train seeds it."""
    spec = importlib.util.spec_from_file_location("pico_train_decoder", os.path.join(path, "src", "model",
                                                                                       "pico_decoder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(42)
    return module.PicoDecoder(types.SimpleNamespace(**dataclasses.asdict(model_config), batch_size=1024))


def pretrain_engine(preset: str, seq: int, micro_batch: int, precision: str, deepspeed_config: str,
                    compile_blocks: bool):  # noqa: ANN201
    """The DeepSpeed engine pretrain.py builds, in a world of one process."""
    from megapico.parallel import ParallelState, init_distributed
    from megapico.training.trainer import build_engine

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    init_distributed()
    config = load_config(None, [f"model_preset={preset}", f"model.max_seq_len={seq}", f"data.seq_len={seq}",
                                f"training.micro_batch_size={micro_batch}", f"training.precision={precision}",
                                f"training.deepspeed_config={deepspeed_config}", f"training.compile={compile_blocks}"])
    engine, _ = build_engine(config, ParallelState.build(1))
    return engine
