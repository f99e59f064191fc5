"""Pieces of the trainer that need no engine: schedule, DeepSpeed config derivation, eval, pre-flight checks."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TOKENIZER

from megapico.config import ConfigError, ModelConfig, load_config
from megapico.data.builders import build_dataset
from megapico.data.indexed_dataset import DataError
from megapico.model import PicoDecoder
from megapico.parallel import ParallelState
from megapico.training.deepspeed_config import build_deepspeed_config
from megapico.training.evaluation import evaluate_perplexity
from megapico.training.metrics import flops_per_token, matmul_parameters
from megapico.training.schedule import build_lr_scheduler, lr_at
from megapico.training.trainer import check_data_fits_model


def test_pico_schedule_values():
    train = load_config(None, ["training.lr=3e-4", "training.lr_warmup_steps=2500", "training.max_steps=200000"]
                        ).training
    assert lr_at(0, train) == 0.0
    assert lr_at(1250, train) == pytest.approx(1.5e-4)
    assert lr_at(2500, train) == pytest.approx(3e-4)
    assert lr_at(101_250, train) == pytest.approx(1.5e-4)
    assert lr_at(200_000, train) == 0.0
    cosine = load_config(None, ["training.lr_decay_style=cosine", "training.min_lr=3e-5", "training.max_steps=100",
                                "training.lr_warmup_steps=0", "training.lr=3e-4"]).training
    assert lr_at(50, cosine) == pytest.approx(3e-5 + 0.5 * 2.7e-4)
    assert lr_at(100, cosine) == pytest.approx(3e-5)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_lr_scheduler(optimizer, train)
    for _ in range(1250):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4)


def test_deepspeed_config_is_derived_and_disagreements_are_errors(tmp_path):
    cpu_json, a100_json = REPO / "ds_configs" / "zero2_cpu.json", REPO / "ds_configs" / "zero2_a100.json"
    config = load_config(None, ["training.micro_batch_size=4", "training.gradient_accumulation_steps=8",
                                "training.precision=fp32", f"training.deepspeed_config={cpu_json}"])
    ds = build_deepspeed_config(config, dp_size=16)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        512, 4, 8)
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 2
    a100 = build_deepspeed_config(load_config(None, ["training.precision=bf16", "model_preset=tiny",
                                                     f"training.deepspeed_config={a100_json}"]), 16)
    assert a100["bf16"]["enabled"] is True
    # fp32 gradient accumulation over micro-steps and fp32 reduction over DP under DeepSpeed's bf16
    assert a100["data_types"] == {"grad_accum_dtype": "fp32"} and a100["communication_data_type"] == "fp32"
    # tiny (11.3M parameters) fits one 40M bucket: sized to the model, nothing to overlap
    zero = a100["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 11_282_944 and not zero["overlap_comm"]
    medium = build_deepspeed_config(load_config(None, ["training.precision=bf16-mixed", "model_preset=medium",
                                                       f"training.deepspeed_config={a100_json}"]), 16)
    assert medium["bf16"]["enabled"] is False  # bf16-mixed: an fp32 engine under torch.autocast, entered by it
    assert medium["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert a100["torch_autocast"] == ds["torch_autocast"] == {"enabled": False}
    assert medium["zero_optimization"]["reduce_bucket_size"] == 40_000_000 and medium["zero_optimization"][
        "overlap_comm"]
    cases = [({"train_batch_size": 100}, "train_batch_size=100 disagrees with the megapico config (512)"),
             ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
             ({"bf16": {"enabled": True}}, "bf16.enabled=True disagrees with training.precision=fp32"),
             ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3"),
             ({"torch_autocast": {"enabled": True}},
              'torch_autocast={"enabled": true} disagrees with training.precision')]
    for extra, message in cases:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(extra))
        config.training.deepspeed_config = str(path)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_deepspeed_config(config, dp_size=16)
    path.write_text(json.dumps({"torch_autocast": {"lower_precision_safe_modules": ["torch.nn.Linear"]}}))
    config.training.precision = "bf16-mixed"  # DeepSpeed would reduce those modules' gradients in bf16
    with pytest.raises(ConfigError, match="lower_precision_safe_modules"):
        build_deepspeed_config(config, dp_size=16)
    path.write_text(json.dumps({"communication_data_type": "bf16"}))
    config.training.precision = "bf16"
    with pytest.raises(ConfigError, match="communication_data_type=bf16 would accumulate or reduce gradients in bf16"):
        build_deepspeed_config(config, dp_size=16)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="ds.json: not valid JSON"):
        build_deepspeed_config(config, dp_size=16)


def test_eval_perplexity_equals_a_direct_computation(sample_prefix):
    config = ModelConfig(d_model=48, n_layers=2, attention_n_heads=12, attention_n_kv_heads=4,
                         activation_hidden_dim=96, vocab_size=50304, max_seq_len=32)
    torch.manual_seed(0)
    model = PicoDecoder(config)
    dataset = build_dataset([sample_prefix], "valid", 1, 16, 5, split="95,5,0")
    ppl = evaluate_perplexity(model, dataset, micro_batch_size=3, parallel=ParallelState(), max_sequences=11)
    with torch.no_grad():  # the first 11 samples: three micro batches of 3, then a short one of 2
        tokens = torch.stack([torch.from_numpy(dataset[i]) for i in range(11)])
        logits = model(tokens[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_preflight_data_checks(sample_prefix, tmp_path):
    def config(*extra):
        return load_config(None, [f"data.train_data_path=[{sample_prefix}]", f"data.tokenizer={TOKENIZER}", *extra])

    check_data_fits_model(config())
    with pytest.raises(DataError, match="its ids reach 50279, the model's vocab_size is 1024"):
        check_data_fits_model(config("model.vocab_size=1024"))
    with pytest.raises(DataError, match=r"sample_text_document: its token ids reach 50279 \(.*megapico.json\), the "
                                        r"model's vocab_size is 1024"):
        check_data_fits_model(config("model.vocab_size=1024", "data.tokenizer=''"))
    Path(f"{sample_prefix}.megapico.json").rename(tmp_path / "record.json")  # data built elsewhere: the id scan
    try:
        with pytest.raises(DataError, match=r"sample_text_document.bin: token id 50279 >= model.vocab_size 1024"):
            check_data_fits_model(config("model.vocab_size=1024", "data.tokenizer=''"))
    finally:
        (tmp_path / "record.json").rename(f"{sample_prefix}.megapico.json")
    with pytest.raises(DataError, match=r"nowhere.idx: missing \(build it with tools/preprocess_data.py"):
        check_data_fits_model(config(f"data.train_data_path=[{tmp_path}/nowhere]"))


def test_flop_formula_counts_matmul_parameters():
    tiny = load_config(None, ["model_preset=tiny"]).model
    assert matmul_parameters(tiny) == 11_282_784 - 50304 * 96 - 25 * 96  # all but the embedding table and norms
    assert flops_per_token(tiny, 2048) == 6 * matmul_parameters(tiny) + 12 * 12 * 96 * 2048


def test_separate_eval_prefix(sample_prefix):
    from megapico.training.trainer import build_eval_dataset

    config = load_config(None, [f"data.train_data_path=[{sample_prefix}]", f"data.eval_data_path=[{sample_prefix}]",
                                "data.seq_len=16", "evaluation.max_sequences=4", "training.micro_batch_size=2"])
    whole = build_eval_dataset(config)  # the eval prefix whole (split 1,0,0), not its valid part
    valid = build_dataset([sample_prefix], "valid", 4, 16, config.data.seed, split=config.data.split)
    assert len(whole.documents) == 3187 and len(valid.documents) < 100
