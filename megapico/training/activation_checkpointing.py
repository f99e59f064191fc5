"""Activation checkpointing as a switch on the model's blocks (torchtitan's apply_ac, without wrappers,
so state-dict keys stay pico's). Recomputation repeats the TP collectives in the same order on every
rank, and there is no dropout, so losses and gradients are unchanged."""

from torch import nn

from megapico.config import ActivationCheckpointingConfig


def apply_activation_checkpointing(model: nn.Module, ac: ActivationCheckpointingConfig) -> int:
    """full: recompute every N-th block in backward (the fused loss head keeps no logits, so it needs none);
    selective: only the attention core of every N-th block (with flash-style SDPA there is no s x s matrix to
    save, so it frees little). Returns the number of blocks set."""
    if ac.mode == "none":
        return 0
    chosen = [layer for index, layer in enumerate(model.layers) if index % ac.every_n_layers == 0]
    for layer in chosen:
        if ac.mode == "full":
            layer.checkpoint_activations = True
        else:
            layer.attention.checkpoint_core = True
    return len(chosen)
