"""Forward+backward tokens/s of megapico's PicoDecoder (TP=1) against a plain single-file eager model.

The peer is tests/reference_pico.py (nn.Linear, complex RoPE, explicit mask, repeat_interleave): the same
model written the obvious way. Both run in this process on the same batches; the ratio is what counts.
    python benchmarks/bench_model.py --preset tiny --batch 8 --seq 256 --steps 10
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from host import cpu_run_settings  # noqa: E402
from reference_pico import ReferencePicoDecoder  # noqa: E402

from megapico.config import MODEL_PRESETS  # noqa: E402
from megapico.model import PicoDecoder  # noqa: E402


def tokens_per_second(model, batches, loss_fn):
    for input_ids, labels in batches[:2]:  # warm-up
        loss_fn(model, input_ids, labels).backward()
    start = time.perf_counter()
    for input_ids, labels in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, input_ids, labels).backward()
    return sum(b[0].numel() for b in batches) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=0, help="override n_layers (0 = preset)")
    args = parser.parse_args()
    config = MODEL_PRESETS[args.preset]
    if args.layers:
        config = dataclasses.replace(config, n_layers=args.layers)
    torch.manual_seed(0)
    batches = [(torch.randint(0, config.vocab_size, (args.batch, args.seq)),
                torch.randint(0, config.vocab_size, (args.batch, args.seq))) for _ in range(args.steps)]
    torch.manual_seed(42)
    ours = PicoDecoder(config)
    torch.manual_seed(42)
    peer = ReferencePicoDecoder(config)

    def peer_loss(model, input_ids, labels):
        return torch.nn.functional.cross_entropy(model(input_ids).flatten(0, 1), labels.flatten())

    results = {}
    for _ in range(2):  # alternate to share the machine's noise
        results.setdefault("megapico", []).append(tokens_per_second(ours, batches, lambda m, x, y: m(x, y)))
        results.setdefault("eager", []).append(tokens_per_second(peer, batches, peer_loss))
    best = {name: max(values) for name, values in results.items()}
    print(f"preset={args.preset} layers={config.n_layers} batch={args.batch} seq={args.seq} {cpu_run_settings()}")
    print(f"megapico {best['megapico']:,.0f} tok/s | plain eager {best['eager']:,.0f} tok/s | "
          f"ratio {best['megapico'] / best['eager']:.2f}x")


if __name__ == "__main__":
    main()
