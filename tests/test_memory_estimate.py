"""tools/estimate_memory.py's activation term against what autograd really saves (saved_tensors_hooks) for
pico-decoder-tiny at TP=1 and TP=2, with and without sequence parallelism, with full checkpointing, in fp32 and
under bf16 autocast (bf16-mixed, the GPU recipes' precision)."""

import dataclasses

import pytest
import torch
from distributed import run_distributed

from megapico.config import MODEL_PRESETS, ActivationCheckpointingConfig
from megapico.model import PicoDecoder
from megapico.training.activation_checkpointing import apply_activation_checkpointing
from megapico.training.memory_estimate import activation_bytes, saved_for_backward

CONFIG = dataclasses.replace(MODEL_PRESETS["tiny"], max_seq_len=128)
MICRO, SEQ = 2, 128


def _measure(rank, world_size, sequence_parallel, checkpointed, precision):
    from megapico.parallel import ParallelState

    group = ParallelState.build(world_size).tp_group if world_size > 1 else None
    torch.manual_seed(42)
    model = PicoDecoder(CONFIG, group, sequence_parallel=sequence_parallel)
    if checkpointed:
        apply_activation_checkpointing(model, ActivationCheckpointingConfig(mode="full"))
    tokens = torch.randint(0, CONFIG.vocab_size, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            return model(tokens[:, :-1], tokens[:, 1:])

    return saved_for_backward(loss, model.parameters())[0]


@pytest.mark.parametrize("tp,sequence_parallel,checkpointed,precision", [
    (1, False, False, "fp32"), (2, False, False, "fp32"), (2, True, False, "fp32"), (1, False, True, "fp32"),
    (1, False, False, "bf16-mixed"), (2, True, False, "bf16-mixed")])
def test_activation_estimate_within_15_percent_of_the_saved_bytes(tp, sequence_parallel, checkpointed, precision,
                                                                  tmp_path):
    measured = (_measure(0, 1, False, checkpointed, precision) if tp == 1 else
                run_distributed(_measure, tp, sequence_parallel, checkpointed, precision, tmp_path=tmp_path))
    estimate = activation_bytes(CONFIG, MICRO, SEQ, tp, precision, sequence_parallel, checkpointed, device="cpu")
    assert abs(estimate - measured) <= 0.15 * measured, (estimate, measured)


def test_compiled_blocks_save_what_eager_blocks_save():
    """training.compile's per-block torch.compile keeps the eager model's saved tensors (the estimate's): SwiGLU's
    gate and up but not w_2's input, and the norms' inputs but not their normalised outputs."""
    config = dataclasses.replace(CONFIG, n_layers=1, max_seq_len=64)
    torch.manual_seed(42)
    model = PicoDecoder(config)
    tokens = torch.randint(0, config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    eager = saved_for_backward(lambda: model(tokens[:, :-1], tokens[:, 1:]), model.parameters())
    model.layers[0].compile()
    compiled = saved_for_backward(lambda: model(tokens[:, :-1], tokens[:, 1:]), model.parameters())
    assert compiled == eager
