"""megapico: tensor-parallel + DeepSpeed ZeRO-2 pretraining of the pico-decoder models."""
