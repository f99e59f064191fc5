"""The exported pico model generates: KV cache, left padding, T=1 prompts, the same tokens as the Llama export
and as megapico's own model; the converter's generation check."""

import pytest
import torch
from conftest import TOKENIZER
from transformers import AutoModelForCausalLM

from megapico.config import ModelConfig
from megapico.convert.generate import reference_greedy
from megapico.convert.hf_export import write_llama, write_pico_hf
from megapico.model import PicoDecoder

CONFIG = ModelConfig(d_model=48, n_layers=2, attention_n_heads=12, attention_n_kv_heads=4, activation_hidden_dim=96,
                     vocab_size=50304, max_seq_len=64)
PROMPTS = [[50, 1200, 7, 99, 31000], [12], [4000, 4001, 17, 17, 17, 17, 2500, 3]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    model = PicoDecoder(CONFIG)
    write_pico_hf(model.state_dict(), CONFIG, str(TOKENIZER), tmp / "pico", 4)
    write_llama(model.state_dict(), CONFIG, str(TOKENIZER), tmp / "llama")
    pico = AutoModelForCausalLM.from_pretrained(tmp / "pico", trust_remote_code=True, dtype=torch.float32)
    llama = AutoModelForCausalLM.from_pretrained(tmp / "llama", dtype=torch.float32)
    return model, pico, llama


def greedy(model, prompt, new_tokens=10, **kwargs):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def test_pico_generate_equals_llama_and_megapico_with_and_without_cache(exports):
    model, pico, llama = exports
    for prompt in PROMPTS:  # T=1 prompt included
        ours, _ = reference_greedy(model, torch.tensor([prompt]), 10)
        assert greedy(pico, prompt) == greedy(pico, prompt, use_cache=False) == greedy(llama, prompt) == ours[0]


@torch.no_grad()
def test_cached_logits_equal_full_recomputation_at_every_step(exports):
    from transformers.cache_utils import DynamicCache

    _, pico, _ = exports
    ids = torch.tensor([PROMPTS[0]])
    cache = DynamicCache()
    cache_arg = "cache" if "cache" in type(pico(ids)).__dataclass_fields__ else "past_key_values"
    step_ids = ids
    for _ in range(8):
        cached = pico(step_ids, use_cache=True, **{cache_arg: cache})
        full = pico(ids)
        assert (cached.logits[:, -1] - full.logits[:, -1]).abs().max() <= 1e-5
        next_id = full.logits[:, -1].argmax(-1, keepdim=True)
        ids, step_ids = torch.cat((ids, next_id), dim=1), next_id
    # a plain forward without cache or padding is the computation it always was: megapico's logits
    assert (pico(ids).logits - exports[0](ids)).abs().max() <= 1e-5


def test_left_padded_batch_equals_the_prompts_one_by_one(exports):
    _, pico, _ = exports
    width = max(len(p) for p in PROMPTS)
    batch = torch.tensor([[1] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = pico.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                        pad_token_id=1)
    for row, prompt in enumerate(PROMPTS):
        assert out[row, width:].tolist() == greedy(pico, prompt, 6)


def test_exports_stop_at_end_of_text_in_transformers_generate_and_every_file_is_readable(tmp_path):
    """A model built to answer any token with token 100 and token 100 with <|endoftext|>: transformers' generate,
    given nothing but the export, stops after [100, eos] as tools/generate.py does (without the export's
    generation_config.json it ran on to max_new_tokens). Every exported file has a plain file's permissions."""
    import os
    import stat

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    eos = Tokenizer.from_file(str(TOKENIZER)).token_to_id("<|endoftext|>")
    config = ModelConfig(d_model=16, n_layers=1, attention_n_heads=4, attention_n_kv_heads=2, activation_hidden_dim=32,
                         vocab_size=50304, max_seq_len=32)
    state = {key: torch.zeros_like(value) for key, value in PicoDecoder(config).state_dict().items()}
    for key in state:
        if key.endswith("norm.weight"):
            state[key] += 1
    state["embedding_proj.weight"][:, 0] = 1  # every token -> direction 0 (blocks add nothing: their outputs are 0)
    state["embedding_proj.weight"][100] = torch.eye(16)[1]  # token 100 -> direction 1
    state["de_embedding_proj.weight"][100, 0] = state["de_embedding_proj.weight"][eos, 1] = 10
    write_pico_hf(state, config, str(TOKENIZER), tmp_path / "pico", 4)
    write_llama(state, config, str(TOKENIZER), tmp_path / "llama")
    mask = os.umask(0)
    os.umask(mask)
    for name, trust in (("pico", True), ("llama", False)):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=trust, dtype=torch.float32)
        assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (eos, 1)
        ids = torch.tensor([[5, 7, 9]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert out[0, 3:].tolist() == [100, eos], name
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / name)
        assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.eos_token_id) == ("<|endoftext|>", "<|padding|>",
                                                                                      eos)
        for path in (tmp_path / name).iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    # the export's own check compares greedy tokens past end-of-text (the generation_config must not stop or
    # forbid it there): this model's greedy run is [100, eos, 100, eos, ...]
    from types import SimpleNamespace

    from megapico.convert.convert import TOLERANCE, verification_gap

    checkpoint = SimpleNamespace(config=SimpleNamespace(model=config), state_dict=state, directory=tmp_path)
    for name in ("pico", "llama"):
        assert verification_gap(tmp_path / name, checkpoint, name) <= TOLERANCE
