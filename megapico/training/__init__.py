"""DeepSpeed set-up, the training loop, schedule, evaluation, metrics and activation checkpointing."""
