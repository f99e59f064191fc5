"""Text from a checkpoint: a training checkpoint of any TP x DP layout (through the converter's reader, built in
memory as the pico HF model, no directory written) or an HF directory, sampled with transformers' generate and
the pico model's KV cache. Also the greedy reference the converter checks every export against.
"""

import importlib.util
import json
from pathlib import Path

import torch

from megapico.convert.checkpoint_reader import CheckpointError, load_checkpoint
from megapico.convert.hf_export import MODELLING_FILE, pico_hf_config, tokenizer_json
from megapico.convert.received import export_tokenizer
from megapico.model import PicoDecoder


def _pico_hf_module():  # noqa: ANN202
    """The modelling file the converter ships, imported as a module (it is self-contained)."""
    spec = importlib.util.spec_from_file_location("megapico_pico_decoder_hf", MODELLING_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_from_checkpoint(path: str | Path, device: str = "cpu", tokenizer: str | None = None):  # noqa: ANN201
    """(PicoDecoderHF with the checkpoint's fp32 weights, the tokenizer its export would ship: `tokenizer` if
    given, else the run's own (received.export_tokenizer))."""
    checkpoint = load_checkpoint(path)
    module = _pico_hf_module()
    config = module.PicoDecoderHFConfig(**{key: value for key, value in pico_hf_config(
        checkpoint.config.model, checkpoint.global_batch_size).items() if key not in ("architectures", "auto_map",
                                                                                      "model_type", "torch_dtype")})
    model = module.PicoDecoderHF(config)
    model.pico_decoder.load_state_dict(checkpoint.state_dict)
    return model.to(device).eval(), str(export_tokenizer(checkpoint.directory, checkpoint.config, tokenizer))


def model_from_hf(directory: str | Path, device: str = "cpu", trust_remote_code: bool = False):  # noqa: ANN201
    """An HF directory's model. pico models run megapico's own modelling file, never the directory's
    pico_decoder.py (a downloaded directory's code is its author's); other models run transformers' own classes,
    and a directory's code only with trust_remote_code."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory / 'config.json'}: missing; --hf takes an exported HF directory")
    if json.loads((directory / "config.json").read_text()).get("model_type") == "pico_decoder":
        model = _pico_hf_module().PicoDecoderHF.from_pretrained(str(directory), dtype=torch.float32)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=trust_remote_code,
                                                         dtype=torch.float32)
        except ValueError as err:
            if "trust_remote_code" not in str(err):
                raise
            raise CheckpointError(f"{directory}: its model is defined by code in the directory; read that code, then "
                                  f"pass --trust-remote-code to run it") from None
    return model.to(device).eval(), str(directory / "tokenizer.json")


def load_tokenizer(path: str):  # noqa: ANN201
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json(path)))


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,  # noqa: ANN001
           seed: int = 0, eos_token_id: int | None = None) -> list[int]:
    """New token ids after the prompt: greedy at temperature 0, else temperature + nucleus sampling, seeded."""
    torch.manual_seed(seed)
    input_ids = torch.tensor([prompt_ids], device=model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(
        do_sample=False)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, pad_token_id=eos_token_id if eos_token_id is not None else 0,
                         **sampling)
    return out[0, len(prompt_ids):].tolist()


@torch.no_grad()
def reference_greedy(model: PicoDecoder, prompt: torch.Tensor, new_tokens: int) -> tuple[list[list[int]], list]:
    """megapico's own greedy continuation, re-running the whole sequence each step (no cache): the tokens per
    prompt row, and the last-position logits of every step (to tell a near-tie from a real difference)."""
    ids, steps = prompt, []
    for _ in range(new_tokens):
        logits = model(ids)[:, -1]
        steps.append(logits)
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
    return ids[:, prompt.shape[1]:].tolist(), steps
