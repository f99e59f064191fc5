"""Evaluation is the run's, not the layout's: the same sequences at every TP x DP layout and every resume, and
perplexities at equal weights that agree to summation order."""

import hashlib

import pytest
import torch
from conftest import REPO
from distributed import run_distributed

from megapico.config import ConfigError, ModelConfig, load_config
from megapico.data.builders import build_dataset
from megapico.data.indexed_dataset import IndexedDataset
from megapico.data.pretokenized_dataset import TextDocuments
from megapico.model import PicoDecoder
from megapico.parallel import ParallelState
from megapico.training.evaluation import (
    eval_shard,
    evaluate_perplexity,
    evaluate_text_perplexity,
    evaluated_count,
)
from megapico.training.trainer import build_eval_dataset

MODEL = ModelConfig(d_model=48, n_layers=2, attention_n_heads=12, attention_n_kv_heads=4, activation_hidden_dim=96,
                    vocab_size=50304, max_seq_len=32)
SEQ_LEN, MICRO, BUDGET = 15, 2, 13  # odd sizes: uneven DP shares, short last batches, odd token counts under SP
TEXT_TOKENS = 96  # three 32-token texts per batch: 3 x 31 predictions, a count TP=2 does not divide


def test_the_evaluated_indices_are_the_same_set_at_every_dp_size():
    for total in (1, 7, 98):
        for budget in (0, 5, 64, 1000):
            count = evaluated_count(total, budget)
            assert count == (min(budget, total) if budget else total)
            for dp_size in (1, 2, 3, 4, 16):
                shards = [eval_shard(total, budget, rank, dp_size) for rank in range(dp_size)]
                assert [index for shard in shards for index in shard] == list(range(count))  # disjoint, in order
                assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _evaluated(config, dp_size):
    """Digests of the sequences an evaluation scores at this DP size, the eval set built as a launch builds it."""
    dataset = build_eval_dataset(config)
    shards = [eval_shard(len(dataset), config.evaluation.max_sequences, rank, dp_size) for rank in range(dp_size)]
    return len(dataset), sorted(hashlib.sha1(dataset[index].tobytes()).hexdigest() for shard in shards
                                for index in shard)


def test_the_demo_evaluates_the_same_sequences_at_steps_20_and_40_and_after_a_resume(sample_prefix):
    """cpu_demo.sh's two launches: TP=1 x DP=2 (steps 1-20), then a resume at TP=2 x DP=1 (steps 21-40)."""
    def demo(*overrides):
        return load_config(REPO / "examples" / "cpu_demo.yaml", [f"data.train_data_path=[{sample_prefix}]",
                                                                 *overrides])

    first = demo()
    assert (first.evaluation.name, first.evaluation.max_sequences) == ("dolma-sample-valid", 64)
    total, step_20 = _evaluated(first, dp_size=2)
    assert total == 98 and len(step_20) == 64  # the valid split's 98 sequences (examples/cpu_demo.yaml)
    _, step_40 = _evaluated(demo("parallel.tensor_parallel_size=2"), dp_size=1)  # a resume: the cached index
    assert step_40 == step_20
    _, other_micro = _evaluated(demo("training.micro_batch_size=1", "training.gradient_accumulation_steps=8"), 2)
    assert other_micro == step_20


def test_a_bad_or_stale_evaluation_budget_is_one_line(sample_prefix):
    with pytest.raises(ConfigError, match="evaluation.max_batches"):  # the key before issue 32: counted per rank
        load_config(None, ["evaluation.max_batches=8"])
    config = load_config(None, [f"data.train_data_path=[{sample_prefix}]", "evaluation.max_sequences=-1"])
    with pytest.raises(ConfigError, match=r"evaluation.max_sequences must be >= 0 \(0 = the whole eval set\), got -1"):
        build_eval_dataset(config)
    blend = load_config(None, [f"data.train_data_path=[0.5,{sample_prefix},0.5,{sample_prefix}]"])
    with pytest.raises(ConfigError, match="is a weighted blend, which has no whole; set evaluation.max_sequences"):
        build_eval_dataset(blend)


def _eval_sets(prefix):
    return (build_dataset([prefix], "valid", 1, SEQ_LEN, 5, split="95,5,0"),
            TextDocuments(IndexedDataset(prefix), MODEL.max_seq_len, "evaluation"))


def _perplexities(model, parallel, samples, texts):
    return (evaluate_perplexity(model, samples, MICRO, parallel, max_sequences=BUDGET),
            evaluate_text_perplexity(model, texts, TEXT_TOKENS, parallel, max_sequences=BUDGET))


def _evaluate_at_two_layouts(rank, world_size, prefix):
    """The same weights (one seeded full init, sliced per TP rank) at TP=1 x DP=2, TP=2 x DP=1 and TP=2 with SP."""
    samples, texts = _eval_sets(prefix)
    results = {}
    for tp, sequence_parallel in ((1, False), (2, False), (2, True)):
        parallel = ParallelState.build(tp)
        torch.manual_seed(0)
        model = PicoDecoder(MODEL, parallel.tp_group if tp > 1 else None, sequence_parallel=sequence_parallel)
        results[f"TP={tp} x DP={parallel.dp_size}{' SP' if sequence_parallel else ''}"] = _perplexities(
            model, parallel, samples, texts)
    return results


def test_perplexities_at_equal_weights_agree_at_every_layout(sample_prefix, tmp_path):
    samples, texts = _eval_sets(sample_prefix)  # built here once: the workers map the cached index
    torch.manual_seed(0)
    reference = _perplexities(PicoDecoder(MODEL), ParallelState(), samples, texts)  # TP=1 x DP=1
    layouts = run_distributed(_evaluate_at_two_layouts, 2, sample_prefix, tmp_path=tmp_path)
    assert sorted(layouts) == ["TP=1 x DP=2", "TP=2 x DP=1", "TP=2 x DP=1 SP"]
    for layout, perplexities in layouts.items():
        assert perplexities == pytest.approx(reference, rel=1e-6), layout
