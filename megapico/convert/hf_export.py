"""Write a pico HF directory or a plain transformers Llama directory from a full pico state dict.

pico: config.json (pico's keys), model.safetensors (fp32, `pico_decoder.` + pico keys), pico_decoder.py
(megapico/convert/pico_decoder_hf.py) and the run's tokenizer files.
Llama: LlamaForCausalLM keys and config; q/k rows permuted from pico's interleaved RoPE pairs (2i, 2i+1) to
Llama's rotate-half pairs (i, i + head_dim/2); GQA and untied embeddings kept.
Both: the tokenizer as `tokenizers` re-serialises it (received.clean_tokenizer_json) with megapico's own
tokenizer_config.json and special_tokens_map.json (pico's: end-of-text and padding tokens), and a
generation_config.json naming the end-of-text id, so transformers' `generate` stops where tools/generate.py stops.
Every file gets the permissions a plain new file has (safetensors alone would write 0600).
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megapico.config import ModelConfig
from megapico.convert.checkpoint_reader import CheckpointError
from megapico.convert.received import clean_tokenizer_json, tokenizer_json
from megapico.data.tokenizer import EOD_CANDIDATES

MODELLING_FILE = Path(__file__).with_name("pico_decoder_hf.py")  # written into exports as pico_decoder.py
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENERATION_CONFIG = "generation_config.json"
PAD_TOKEN = "<|padding|>"  # pico's tokenizer pads with it; one without pads with its end-of-text token


def pico_hf_config(model: ModelConfig, batch_size: int, token_ids: dict[str, int] | None = None) -> dict:
    """pico's config.json; `token_ids` (eos_token_id, pad_token_id) added when given: pico's own file has none,
    and transformers reads them as the model's defaults."""
    return {
        "activation_hidden_dim": model.activation_hidden_dim, "architectures": ["PicoDecoderHF"],
        "attention_n_heads": model.attention_n_heads, "attention_n_kv_heads": model.attention_n_kv_heads,
        "auto_map": {"AutoConfig": "pico_decoder.PicoDecoderHFConfig",
                     "AutoModelForCausalLM": "pico_decoder.PicoDecoderHF"},
        "batch_size": batch_size, "d_model": model.d_model, "max_seq_len": model.max_seq_len,
        "model_type": "pico_decoder", "n_layers": model.n_layers, "norm_eps": model.norm_eps,
        "position_emb_theta": model.position_emb_theta, "torch_dtype": "float32", "vocab_size": model.vocab_size,
        **(token_ids or {}),
    }


def write_tokenizer(tokenizer_path: str | Path, model: ModelConfig, out_dir: Path) -> dict[str, int]:
    """tokenizer.json (re-serialised by `tokenizers`), tokenizer_config.json and special_tokens_map.json (pico's
    special tokens); returns the ids generation needs: eos_token_id, and pad_token_id."""
    from tokenizers import Tokenizer

    file = tokenizer_json(tokenizer_path)
    text = clean_tokenizer_json(file)
    tokenizer = Tokenizer.from_str(text)
    if tokenizer.get_vocab_size() > model.vocab_size:
        raise CheckpointError(f"{file}: tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
                              f"vocab_size {model.vocab_size}; it is not the tokenizer this model was trained with")
    (out_dir / "tokenizer.json").write_text(text)
    eos = next((token for token in EOD_CANDIDATES if tokenizer.token_to_id(token) is not None), None)
    pad = PAD_TOKEN if tokenizer.token_to_id(PAD_TOKEN) is not None else eos
    special = {key: value for key, value in (("eos_token", eos), ("pad_token", pad)) if value}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.max_seq_len,
         "clean_up_tokenization_spaces": False, **special}, indent=2))
    return {f"{key}_id": tokenizer.token_to_id(value) for key, value in special.items()}


def write_generation_config(token_ids: dict[str, int], out_dir: Path) -> None:
    """generation_config.json: greedy by default, ending at the tokenizer's end-of-text token."""
    (out_dir / GENERATION_CONFIG).write_text(json.dumps(token_ids, indent=2, sort_keys=True))


def plain_permissions(out_dir: Path) -> None:
    """Every file of an export readable as a plain new file is (0644 under the usual umask)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in out_dir.iterdir():
        os.chmod(path, 0o666 & ~mask)


def write_pico_hf(state_dict: dict[str, torch.Tensor], model: ModelConfig, tokenizer_path: str | Path, out_dir: Path,
                  batch_size: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    token_ids = write_tokenizer(tokenizer_path, model, out_dir)
    (out_dir / "config.json").write_text(json.dumps(pico_hf_config(model, batch_size, token_ids), indent=2,
                                                    sort_keys=True))
    write_generation_config(token_ids, out_dir)
    save_file({f"pico_decoder.{key}": value.float().contiguous() for key, value in state_dict.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(MODELLING_FILE, out_dir / "pico_decoder.py")
    plain_permissions(out_dir)


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


def write_llama(state_dict: dict[str, torch.Tensor], model: ModelConfig, tokenizer_path: str | Path,
                out_dir: Path) -> None:
    from transformers import LlamaConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    token_ids = write_tokenizer(tokenizer_path, model, out_dir)
    LlamaConfig(vocab_size=model.vocab_size, hidden_size=model.d_model, intermediate_size=model.activation_hidden_dim,
                num_hidden_layers=model.n_layers, num_attention_heads=model.attention_n_heads,
                num_key_value_heads=model.attention_n_kv_heads, max_position_embeddings=model.max_seq_len,
                rms_norm_eps=model.norm_eps, rope_theta=model.position_emb_theta, tie_word_embeddings=False,
                attention_bias=False, mlp_bias=False, hidden_act="silu", torch_dtype="float32",
                architectures=["LlamaForCausalLM"], bos_token_id=None,  # Llama's defaults (1, 2) are not pico's ids
                **token_ids).save_pretrained(out_dir)
    write_generation_config(token_ids, out_dir)
    save_file(to_llama_state_dict(state_dict, model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    plain_permissions(out_dir)
