"""megapico against pico-train's own Trainer on the same pretokenized rows: losses, weights, learning dynamics, paloma.

pico-train runs as its scripts/train.py does (Trainer(config).train()), CPU, one device, precision 32-true, with
its dependencies in a venv of their own (its pins: lightning 2.4.0, transformers 4.x, datasets < 3.2,
deepspeed 0.16.2; torch 2.13.0 here):
    python3 -m venv /work/pico-venv
    /work/pico-venv/bin/pip install torch==2.13.0 lightning==2.4.0 "transformers>=4.45,<5" "datasets>=3.0.1,<3.2" \\
        deepspeed==0.16.2 evaluate wandb click rich psutil pyyaml "huggingface-hub<1" pyarrow
    python benchmarks/vs_pico_train.py --pico-train CHECKOUT --pico-python /work/pico-venv/bin/python
The only thing added to its Trainer is a wrapper around _log_training_metrics that writes each step's loss at
full precision (its console prints 4 decimals). pico-train's one-device learning-dynamics activations are stored
with each sub-batch's rows scrambled (its gather reshape assumes a world dimension; see unscramble_one_device);
they are compared after undoing that. Its Paloma metric loads from the hub, so pico-train runs with
`evaluation.metrics: []` and its number is computed here on its step-N HF checkpoint with HF evaluate's formula
(the pico venv's transformers and pico-train's own modelling file).

Data (all from the shipped Dolma sample, tokenized with pico's tokenizer plus an end-of-document token): rows of
seq_len + 1 tokens as pico-lm/pretokenized-dolma's data/train-*.parquet (pico-train's `data.dataset.name`), held-out
rows as data/val-*.parquet (its `learning_dynamics.eval_data`), and wikihow texts as paloma-tinsy's `text`.
megapico reads the same files through tools/preprocess_data.py --json-keys input_ids / text.
"""

import argparse
import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
TOKENIZER = REPO / "data" / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"
SEQ, GLOBAL, ACCUMULATION, STEPS, SAVE, VAL_ROWS, TEXTS = 64, 16, 2, 12, 6, 48, 40
LR, WARMUP = 3e-4, 4

PICO_RUNNER = textwrap.dedent("""
    import json, sys
    from src.training.trainer import Trainer

    config_path, losses_path = sys.argv[1], sys.argv[2]
    log = Trainer._log_training_metrics

    def recording(self, interval_loss, interval_steps, interval_inf_or_nan_count, batch_step):
        # pico logs at batch_step b the sub-batches that optimizer step b + 1 applies
        with open(losses_path, "a") as handle:
            handle.write(json.dumps({"step": batch_step + 1,
                                     "loss": interval_loss.item() / max(interval_steps.item(), 1)}) + "\\n")
        return log(self, interval_loss, interval_steps, interval_inf_or_nan_count, batch_step)

    Trainer._log_training_metrics = recording
    Trainer(config_path=config_path).train()
""")

PICO_PALOMA = textwrap.dedent("""
    import json, sys
    import numpy as np, pyarrow.parquet as pq, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, texts_path, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    perplexities = []
    for text in pq.read_table(texts_path)["text"].to_pylist():
        ids = torch.tensor([tokenizer(text, add_special_tokens=False, truncation=True,
                                      max_length=max_length)["input_ids"]])
        with torch.no_grad():
            output = model(ids)
        logits = output.logits if hasattr(output, "logits") else output[0]
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
        perplexities.append(torch.exp(nll.mean()).item())
    print(json.dumps({"paloma": float(np.mean(perplexities))}))
""")


def prepare_data(work: Path) -> dict[str, str]:
    """The parquet files pico-train reads and the .bin/.idx prefixes megapico reads, from the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from make_pretokenized_parquet import write_pretokenized_parquet

    from megapico.config import ModelConfig
    from megapico.convert.hf_export import write_tokenizer
    from megapico.data.preprocess import PreprocessOptions, preprocess

    stream = work / "sample"
    preprocess(PreprocessOptions(input=str(REPO / "data" / "sample" / "documents"), output_prefix=str(stream),
                                 tokenizer_model=str(TOKENIZER), append_eod=True))
    stream_prefix = f"{stream}_text_document"
    train_rows = STEPS * GLOBAL
    write_pretokenized_parquet(stream_prefix, work / "dolma", SEQ + 1, rows_per_file=64, max_rows=train_rows)
    write_pretokenized_parquet(stream_prefix, work / "ld_val", SEQ + 1, rows_per_file=VAL_ROWS, max_rows=VAL_ROWS,
                               split="val", skip_rows=train_rows)
    with gzip.open(REPO / "data" / "sample" / "documents" / "wikihow-0000.json.gz", "rt") as handle:
        texts = [json.loads(line)["text"] for line in itertools.islice(handle, TEXTS)]
    (work / "paloma" / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), work / "paloma" / "data" / "val-00000-of-00001.parquet")
    for name, keys, tokenizer in (("dolma", ["input_ids"], None), ("ld_val", ["input_ids"], None),
                                  ("paloma", ["text"], str(TOKENIZER))):
        preprocess(PreprocessOptions(input=str(work / name), output_prefix=str(work / f"{name}_prefix"),
                                     json_keys=keys, tokenizer_model=tokenizer,
                                     vocab_size=None if tokenizer else 50304))
    (work / "tokenizer").mkdir()
    write_tokenizer(str(TOKENIZER), ModelConfig(), work / "tokenizer")
    return dict(train=f"{work}/dolma_prefix_input_ids_document", ld_val=f"{work}/ld_val_prefix_input_ids_document",
                paloma=f"{work}/paloma_prefix_text_document")


def run_pico_train(checkout: Path, python: str, work: Path) -> dict[int, float]:
    import yaml

    config = {
        "data": {"dataset": {"name": str(work / "dolma")}, "dataloader": {"batch_size": GLOBAL},
                 "tokenizer": {"name": str(work / "tokenizer"), "vocab_size": 50304}},
        "model": {"d_model": 96, "activation_hidden_dim": 384, "n_layers": 12, "attention_n_heads": 12,
                  "attention_n_kv_heads": 4, "max_seq_len": SEQ, "batch_size": GLOBAL},
        "training": {"max_steps": STEPS, "fabric": {"num_devices": 1, "num_nodes": 1, "precision": "32-true",
                                                     "accelerator": "cpu"},
                     "optimization": {"lr": LR, "lr_warmup_steps": WARMUP,
                                      "gradient_accumulation_steps": ACCUMULATION}},
        "checkpointing": {"run_name": "pico", "runs_dir": str(work / "pico_runs"), "save_every_n_steps": SAVE,
                          "learning_dynamics": {"batch_size": 8, "eval_data": str(work / "ld_val")}},
        "evaluation": {"metrics": []},
        "monitoring": {"save_to_wandb": False, "logging": {"log_every_n_steps": 1}},
    }
    (work / "pico.yaml").write_text(yaml.safe_dump(config))
    (work / "pico_runner.py").write_text(PICO_RUNNER)
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([python, str(work / "pico_runner.py"), str(work / "pico.yaml"), str(work / "pico_losses")],
                         cwd=checkout, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"pico-train failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return {r["step"]: r["loss"] for r in map(json.loads, (work / "pico_losses").read_text().splitlines())}


def megapico_settings(work: Path, prefixes: dict[str, str], name: str, tp: int, dp: int) -> list[str]:
    """The pico-train run's recipe as megapico overrides, at TP x DP with the same global batch."""
    micro = GLOBAL // (dp * ACCUMULATION)
    return [
        "model_preset=tiny", f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}", "data.samples=pretokenized",
        f"data.train_data_path=[{prefixes['train']}]", f"data.eval_data_path=[{prefixes['paloma']}]",
        f"data.tokenizer={TOKENIZER}", f"training.max_steps={STEPS}", f"training.micro_batch_size={micro}",
        f"training.gradient_accumulation_steps={ACCUMULATION}", f"training.lr={LR}",
        f"training.lr_warmup_steps={WARMUP}", "training.precision=fp32",
        f"training.deepspeed_config={REPO / 'ds_configs' / 'zero2_cpu.json'}", f"parallel.tensor_parallel_size={tp}",
        "evaluation.perplexity=pico", "evaluation.name=paloma", f"evaluation.interval={SAVE}",
        f"checkpointing.save_interval={SAVE}",
        f"checkpointing.runs_dir={work / 'megapico_runs'}", f"checkpointing.run_name={name}",
        f"checkpointing.learning_dynamics.eval_data_path={prefixes['ld_val']}",
        "logging.wandb_mode=disabled", "logging.log_interval=1",
    ]


def run_megapico(settings: list[str], world: int, resume: str) -> None:
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(world), "--master_port", "29617"]
    out = subprocess.run([*launcher, str(REPO / "pretrain.py"), *settings, f"checkpointing.resume={resume}"],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"megapico failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def losses_of(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def weight_gap(run: Path, pico_weights: dict[str, torch.Tensor]) -> float:
    from megapico.convert.checkpoint_reader import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / f"step_{STEPS}").state_dict
    return max((state[k].float() - pico_weights[k].float()).abs().max().item() for k in state)


def layer_key(name: str) -> str:
    """pico-train's learning-dynamics keys carry Fabric's wrapper prefixes; compare from `layers.` on."""
    return name[name.index("layers."):]


def unscramble_one_device(activations: torch.Tensor, sub_batch: int) -> torch.Tensor:
    """pico-train's hook reshapes `fabric.all_gather(rows)` as if it were [world, b, out]: `.transpose(0, 1)
    .reshape(-1, out)`. On one device the gather returns [b, out] itself, so each sub-batch's rows are stored
    transposed-and-reshaped; this undoes it (checked: then equal to megapico's rows to 1e-7)."""
    return torch.cat([chunk.reshape(chunk.shape[1], len(chunk)).t() for chunk in activations.split(sub_batch)])


def dynamics_gaps(pico_dir: Path, ours_dir: Path, split: str) -> tuple[float, float]:
    """(max |activation difference|, max difference of the unit-norm gradients) over every module; pico-train's
    one-device activations unscrambled first (its learning_dynamics.batch_size 8 is the sub-batch)."""
    activation_gap = gradient_gap = 0.0
    pico_act = {layer_key(k): unscramble_one_device(v, 8)
                for k, v in torch.load(pico_dir / f"{split}_activations.pt").items()}
    pico_grad = {layer_key(k): v for k, v in torch.load(pico_dir / f"{split}_gradients.pt").items()}
    ours_act = torch.load(ours_dir / f"{split}_activations.pt")
    ours_grad = torch.load(ours_dir / f"{split}_gradients.pt")
    assert ours_act.keys() == pico_act.keys() and ours_grad.keys() == pico_grad.keys()
    for key in ours_act:
        activation_gap = max(activation_gap, (ours_act[key] - pico_act[key].float()).abs().max().item())
        a, b = ours_grad[key].double(), pico_grad[key].double()
        gradient_gap = max(gradient_gap, (a / a.norm() - b / b.norm()).abs().max().item())
    return activation_gap, gradient_gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pico-train", required=True, type=Path, help="a checkout of pico-lm/pico-train")
    parser.add_argument("--pico-python", default="/work/pico-venv/bin/python", help="python of pico-train's venv")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vs_pico_train"))
    args = parser.parse_args()
    from safetensors.torch import load_file

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    prefixes = prepare_data(args.work)
    pico_losses = run_pico_train(args.pico_train.resolve(), args.pico_python, args.work)
    pico_ckpt = args.work / "pico_runs" / "pico" / "checkpoints"
    out = subprocess.run([args.pico_python, "-c", PICO_PALOMA, str(pico_ckpt / f"step_{STEPS}"),
                          str(args.work / "paloma" / "data" / "val-00000-of-00001.parquet"), str(SEQ)],
                         cwd=args.pico_train, env={**os.environ, "PYTHONPATH": str(args.pico_train),
                                                   "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"paloma on pico-train's checkpoint failed:\n{out.stderr[-3000:]}")
    pico_paloma = json.loads(out.stdout.strip().splitlines()[-1])["paloma"]
    pico_weights = {k.removeprefix("pico_decoder."): v
                    for k, v in load_file(pico_ckpt / f"step_{STEPS}" / "model.safetensors").items()}
    print(f"pico-train: tiny (12 layers, d_model 96), seq {SEQ}, global batch {GLOBAL} = micro "
          f"{GLOBAL // ACCUMULATION} x accumulation {ACCUMULATION}, {STEPS} steps, fp32 CPU, one device")
    for name, tp, dp in (("tp1-dp1", 1, 1), ("tp2-dp2", 2, 2)):
        run_megapico(megapico_settings(args.work, prefixes, name, tp, dp), tp * dp, resume="false")
        run = args.work / "megapico_runs" / name
        ours = losses_of(run)
        print(f"\nmegapico TP={tp} x DP={dp} (micro {GLOBAL // (dp * ACCUMULATION)} x accumulation {ACCUMULATION})")
        print("step | pico-train loss | megapico loss | |diff|")
        for step in sorted(pico_losses):
            print(f"{step:4d} | {pico_losses[step]:.6f} | {ours[step]:.6f} | {abs(pico_losses[step] - ours[step]):.2e}")
        print(f"max |loss diff| {max(abs(pico_losses[s] - ours[s]) for s in pico_losses):.2e}; "
              f"step-{STEPS} weights max |diff| {weight_gap(run, pico_weights):.2e}")
        for step in range(0, STEPS + 1, SAVE):
            for split in ("train", "val"):
                pico_dir = pico_ckpt / f"step_{step}" / "learning_dynamics"
                if not (pico_dir / f"{split}_activations.pt").is_file():
                    continue
                act, grad = dynamics_gaps(pico_dir, run / "checkpoints" / f"step_{step}" / "learning_dynamics", split)
                print(f"learning dynamics step_{step} {split}: activations max |diff| {act:.2e}, unit gradients "
                      f"max |diff| {grad:.2e}")
        ours_paloma = json.loads((run / "eval_results" / f"step_{STEPS}.json").read_text())["paloma"]
        print(f"paloma at step {STEPS}: pico-train's checkpoint {pico_paloma:.6f}, megapico {ours_paloma:.6f}, "
              f"relative diff {abs(ours_paloma - pico_paloma) / pico_paloma:.2e}")
    continue_from_pico_train(args.work, prefixes, pico_ckpt, pico_losses, pico_weights)


def continue_from_pico_train(work: Path, prefixes: dict[str, str], pico_ckpt: Path, pico_losses: dict[int, float],
                             pico_weights: dict[str, torch.Tensor]) -> None:
    """pico-train's step-SAVE checkpoint (one device) imported with tools/convert_from_pico_train.py, continued by
    megapico to step STEPS at TP=1 and TP=2 x DP=2, against pico-train's uninterrupted run."""
    from convert_from_pico_train import main as convert

    for name, tp, dp in (("continued-tp1-dp1", 1, 1), ("continued-tp2-dp2", 2, 2)):
        settings = megapico_settings(work, prefixes, name, tp, dp)
        if convert([str(pico_ckpt / f"step_{SAVE}"), "--output", str(work / "megapico_runs" / name),
                    *[item for item in settings if not item.startswith("checkpointing.r")]]) != 0:
            sys.exit("tools/convert_from_pico_train.py failed")
        run_megapico(settings, tp * dp, resume="true")
        run = work / "megapico_runs" / name
        ours = losses_of(run)
        print(f"\npico-train's step_{SAVE} imported, continued by megapico at TP={tp} x DP={dp} to step {STEPS}")
        print("step | pico-train loss (uninterrupted) | megapico loss | |diff|")
        for step in range(SAVE + 1, STEPS + 1):
            print(f"{step:4d} | {pico_losses[step]:.6f} | {ours[step]:.6f} | {abs(pico_losses[step] - ours[step]):.2e}")
        print(f"max |loss diff| {max(abs(pico_losses[s] - ours[s]) for s in range(SAVE + 1, STEPS + 1)):.2e}; "
              f"step-{STEPS} weights max |diff| {weight_gap(run, pico_weights):.2e}")

if __name__ == "__main__":
    main()
