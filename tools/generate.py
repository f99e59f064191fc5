"""Sample text from a checkpoint: a training checkpoint of any TP x DP layout, or an exported HF directory.

    python tools/generate.py --checkpoint runs/cpu-demo/checkpoints/latest --prompt "The capital of France is"
    python tools/generate.py --checkpoint runs/RUN/checkpoints/step_1000 --prompt "Once" --temperature 0.8 \\
        --top-p 0.95 --seed 3 --max-new-tokens 64
    python tools/generate.py --hf runs/pico/RUN/checkpoints/latest --prompt "Once"
One process, on the GPU when there is one (else CPU); a training checkpoint is read with the converter's reader
(fp32 master weights, any layout) and run as the pico HF model with its KV cache, no directory written.
Temperature 0 (the default) is greedy.
"""

import argparse
import sys

import torch

from megapico.config import ConfigError
from megapico.convert.checkpoint_reader import CheckpointError
from megapico.convert.generate import load_tokenizer, model_from_checkpoint, model_from_hf, sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="runs/RUN/checkpoints/step_N or .../latest")
    source.add_argument("--hf", help="an exported HF directory (pico or llama format)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens to sample (fewer when the end-of-document token comes first)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: draw from the most likely tokens holding this much probability")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (no effect when greedy)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the run's data.tokenizer / the HF directory's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run modelling code that a non-pico --hf directory ships (pico models always run "
                             "megapico's own modelling file)")
    args = parser.parse_args(argv)
    try:
        model, tokenizer_path = (model_from_checkpoint(args.checkpoint, args.device, args.tokenizer) if args.checkpoint
                                 else model_from_hf(args.hf, args.device, args.trust_remote_code))
        tokenizer = load_tokenizer(args.tokenizer or tokenizer_path)
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise CheckpointError("--prompt encodes to no tokens; give some text")
        if max(prompt_ids) >= model.config.vocab_size:
            raise CheckpointError(f"{args.tokenizer or tokenizer_path}: the prompt encodes to id {max(prompt_ids)}, "
                                  f"beyond the model's vocab_size {model.config.vocab_size}; this is not the model's "
                                  f"tokenizer (pass the run's with --tokenizer)")
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        new_ids = sample(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                         eos if isinstance(eos, int) and eos != tokenizer.unk_token_id else None)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(args.prompt + tokenizer.decode(new_ids), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
