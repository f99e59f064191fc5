"""Data: tokenizers, Megatron .bin/.idx writer/reader, the streaming preprocess builder, GPT samples."""
