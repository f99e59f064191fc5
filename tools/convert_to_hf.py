"""Convert megapico checkpoints (any TP x DP layout) into verified Hugging Face checkpoints.

    python tools/convert_to_hf.py --checkpoint runs/cpu-demo/checkpoints/latest --output out/pico-hf
    python tools/convert_to_hf.py --checkpoint runs/RUN/checkpoints/step_1000 --output out/llama --format llama
    python tools/convert_to_hf.py --run-dir runs/cpu-demo --output runs/pico  # -> runs/pico/cpu-demo for pico-analyze
The runs/cpu-demo commands work after examples/cpu_demo.sh; RUN and step_N stand for your run and its steps.
Each export is loaded back with transformers and compared with megapico's model on a fixed batch; a max
|logit difference| above 1e-4 fails the conversion and leaves nothing behind.
"""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from megapico.config import ConfigError
from megapico.convert.checkpoint_reader import CheckpointError, load_checkpoint
from megapico.convert.convert import convert_run, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="runs/RUN/checkpoints/step_N, or .../latest")
    source.add_argument("--run-dir", help="runs/RUN: convert every checkpoint into pico's run layout")
    parser.add_argument("--output", required=True, help="HF directory (--checkpoint) or runs root (--run-dir)")
    parser.add_argument("--format", choices=["pico", "llama"], default="pico",
                        help="pico: pico's own HF model (what pico-analyze reads); llama: a plain LlamaForCausalLM "
                             "(q/k rows permuted), --checkpoint only")
    parser.add_argument("--tokenizer", help="tokenizer.json to ship (default: the run's data.tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits check (not recommended)")
    args = parser.parse_args(argv)
    try:
        if args.run_dir:
            if args.format != "pico":
                raise CheckpointError("--run-dir writes pico's run layout; use --checkpoint for --format llama")
            target = convert_run(Path(args.run_dir), Path(args.output), args.tokenizer, args.overwrite,
                                 not args.no_verify, progress=lambda steps: tqdm(steps, desc="checkpoints"))
            print(f"wrote {target} (pico-analyze: --run_path {target})")
        else:
            checkpoint = load_checkpoint(args.checkpoint)
            gap = export_checkpoint(checkpoint, Path(args.output), args.format, args.tokenizer, args.overwrite,
                                    not args.no_verify)
            print(f"step {checkpoint.step}: {checkpoint.source}; verified max |logit diff| "
                  f"{'skipped' if gap is None else f'{gap:.2e}'}; wrote {args.output}")
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
