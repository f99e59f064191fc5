"""Write a pico HF directory or a plain transformers Llama directory from a full pico state dict.

pico: config.json (pico's keys), model.safetensors (fp32, `pico_decoder.` + pico keys), pico_decoder.py
(megapico/convert/pico_decoder_hf.py) and the run's tokenizer files.
Llama: LlamaForCausalLM keys and config; q/k rows permuted from pico's interleaved RoPE pairs (2i, 2i+1) to
Llama's rotate-half pairs (i, i + head_dim/2); GQA and untied embeddings kept.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megapico.config import ModelConfig
from megapico.convert.checkpoint_reader import CheckpointError

MODELLING_FILE = Path(__file__).with_name("pico_decoder_hf.py")  # written into exports as pico_decoder.py
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def pico_hf_config(model: ModelConfig, batch_size: int) -> dict:
    return {
        "activation_hidden_dim": model.activation_hidden_dim, "architectures": ["PicoDecoderHF"],
        "attention_n_heads": model.attention_n_heads, "attention_n_kv_heads": model.attention_n_kv_heads,
        "auto_map": {"AutoConfig": "pico_decoder.PicoDecoderHFConfig",
                     "AutoModelForCausalLM": "pico_decoder.PicoDecoderHF"},
        "batch_size": batch_size, "d_model": model.d_model, "max_seq_len": model.max_seq_len,
        "model_type": "pico_decoder", "n_layers": model.n_layers, "norm_eps": model.norm_eps,
        "position_emb_theta": model.position_emb_theta, "torch_dtype": "float32", "vocab_size": model.vocab_size,
    }


def tokenizer_json(tokenizer_path: str) -> Path:
    """The tokenizer.json a run names (the file, or the one in an HF directory), or a one-line CheckpointError."""
    source = Path(tokenizer_path)
    file = source / "tokenizer.json" if source.is_dir() else source
    if not file.is_file():
        raise CheckpointError(f"{tokenizer_path}: tokenizer not found (pass --tokenizer PATH to tokenizer.json)")
    return file


def write_tokenizer(tokenizer_path: str, model: ModelConfig, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json from the run's HF tokenizer."""
    from tokenizers import Tokenizer

    file = tokenizer_json(tokenizer_path)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # not a tokenizer file (a received config may name any path): say so, copy nothing
        raise CheckpointError(f"{file}: not a tokenizers JSON file ({str(err).splitlines()[0][:120]}); pass "
                              f"--tokenizer PATH") from None
    if tokenizer.get_vocab_size() > model.vocab_size:
        raise CheckpointError(f"{file}: tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
                              f"vocab_size {model.vocab_size}; it is not the tokenizer this model was trained with")
    shutil.copyfile(file, out_dir / "tokenizer.json")
    eos = "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else None
    pad = "<|padding|>" if tokenizer.token_to_id("<|padding|>") is not None else eos
    special = {key: value for key, value in (("bos_token", eos), ("eos_token", eos), ("unk_token", eos),
                                             ("pad_token", pad)) if value}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.max_seq_len,
         "clean_up_tokenization_spaces": False, **special}, indent=2))


def write_pico_hf(state_dict: dict[str, torch.Tensor], model: ModelConfig, tokenizer_path: str, out_dir: Path,
                  batch_size: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(pico_hf_config(model, batch_size), indent=2, sort_keys=True))
    save_file({f"pico_decoder.{key}": value.float().contiguous() for key, value in state_dict.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(MODELLING_FILE, out_dir / "pico_decoder.py")
    write_tokenizer(tokenizer_path, model, out_dir)


def interleaved_to_rotate_half(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's output rows: new row i <- old 2i, new row i + head_dim/2 <- old 2i + 1."""
    heads = weight.shape[0] // head_dim
    return weight.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


LLAMA_NAMES = {"attention.q_proj": "self_attn.q_proj", "attention.k_proj": "self_attn.k_proj",
               "attention.v_proj": "self_attn.v_proj", "attention.o_proj": "self_attn.o_proj",
               "swiglu.w_0": "mlp.gate_proj", "swiglu.w_1": "mlp.up_proj", "swiglu.w_2": "mlp.down_proj",
               "attention_norm": "input_layernorm", "swiglu_norm": "post_attention_layernorm"}


def to_llama_state_dict(state_dict: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    head_dim = model.d_model // model.attention_n_heads
    out = {"model.embed_tokens.weight": state_dict["embedding_proj.weight"],
           "model.norm.weight": state_dict["output_norm.weight"],
           "lm_head.weight": state_dict["de_embedding_proj.weight"]}
    for i in range(model.n_layers):
        for pico, llama in LLAMA_NAMES.items():
            weight = state_dict[f"layers.{i}.{pico}.weight"]
            if pico in ("attention.q_proj", "attention.k_proj"):
                weight = interleaved_to_rotate_half(weight, head_dim)
            out[f"model.layers.{i}.{llama}.weight"] = weight
    return {key: value.float().contiguous() for key, value in out.items()}


def write_llama(state_dict: dict[str, torch.Tensor], model: ModelConfig, tokenizer_path: str, out_dir: Path) -> None:
    from transformers import LlamaConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=model.vocab_size, hidden_size=model.d_model, intermediate_size=model.activation_hidden_dim,
                num_hidden_layers=model.n_layers, num_attention_heads=model.attention_n_heads,
                num_key_value_heads=model.attention_n_kv_heads, max_position_embeddings=model.max_seq_len,
                rms_norm_eps=model.norm_eps, rope_theta=model.position_emb_theta, tie_word_embeddings=False,
                attention_bias=False, mlp_bias=False, hidden_act="silu", torch_dtype="float32",
                architectures=["LlamaForCausalLM"]).save_pretrained(out_dir)
    save_file(to_llama_state_dict(state_dict, model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(tokenizer_path, model, out_dir)
