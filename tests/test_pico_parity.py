"""pico parity: pretokenized rows in pico-train's order, its learning dynamics, its Paloma number, its precision.

pico-train itself cannot be fetched in CI (benchmarks/vs_pico_train.py runs it); each piece is held here against
megapico's own references: a plain torch loop over the rows in file order, one-process captures, HF evaluate's
perplexity formula computed with transformers on the HF export.
"""

import gzip
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_DOCUMENTS, TOKENIZER
from conftest import training_overrides as overrides
from distributed import run_distributed, train
from make_pretokenized_parquet import write_pretokenized_parquet

from megapico.config import ConfigError, load_config
from megapico.convert.checkpoint_reader import CheckpointError
from megapico.data.builders import build_train_dataset
from megapico.data.indexed_dataset import DataError, IndexedDataset
from megapico.data.preprocess import PreprocessOptions, preprocess
from megapico.data.pretokenized_dataset import PretokenizedDataset, TextDocuments
from megapico.data.sampler import PretrainingSampler
from megapico.model import PicoDecoder
from megapico.parallel import ParallelState
from megapico.training.evaluation import evaluate_text_perplexity
from megapico.training.learning_dynamics import capture_learning_dynamics
from megapico.training.schedule import build_lr_scheduler

SEQ = 32
STEPS = 5
GLOBAL = 4


@pytest.fixture(scope="module")
def pico_rows(sample_prefix, tmp_path_factory):
    """A small pretokenized-dolma: the sample's token stream cut into rows of SEQ + 1, three parquet files,
    preprocessed with --json-keys input_ids."""
    tmp = tmp_path_factory.mktemp("pico-rows")
    write_pretokenized_parquet(sample_prefix, tmp / "download", SEQ + 1, rows_per_file=40, max_rows=120)
    preprocess(PreprocessOptions(input=str(tmp / "download"), output_prefix=str(tmp / "rows"),
                                 json_keys=["input_ids"], vocab_size=50304))
    return str(tmp / "rows_input_ids_document")


@pytest.fixture(scope="module")
def paloma_texts(tmp_path_factory):
    """60 sample texts of many lengths as pico's paloma eval prefix: tokenized without an end-of-document token."""
    tmp = tmp_path_factory.mktemp("paloma")
    with gzip.open(SAMPLE_DOCUMENTS / "wikihow-0000.json.gz", "rt") as handle:
        texts = [json.loads(line)["text"] for line in itertools.islice(handle, 60)]
    (tmp / "texts.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    preprocess(PreprocessOptions(input=str(tmp / "texts.jsonl"), output_prefix=str(tmp / "paloma"),
                                 tokenizer_model=str(TOKENIZER)))
    return str(tmp / "paloma_text_document"), texts


def pico_overrides(pico_rows, tmp_path, **changes):
    return overrides(pico_rows, tmp_path, **{"data.samples": "pretokenized", "data.seq_len": SEQ,
                                             "training.micro_batch_size": 2,
                                             "training.gradient_accumulation_steps": 2, **changes})


def test_preprocessed_rows_are_the_parquet_rows_in_file_order(pico_rows, sample_prefix):
    rows = IndexedDataset(pico_rows)
    stream = IndexedDataset(sample_prefix).token_stream()
    assert len(rows) == 120 and set(rows.sequence_lengths.tolist()) == {SEQ + 1}
    assert np.array_equal(rows.token_stream(), stream[:120 * (SEQ + 1)])  # files by name, rows in file order


@pytest.mark.parametrize("layout", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_each_step_trains_documents_of_its_global_batch_at_any_layout(pico_rows, layout):
    """Step s trains documents [(s-1) G, s G) however DP x accumulation divide them, and a resume at another
    layout continues at document consumed_samples."""
    dp, accumulation = layout
    micro = GLOBAL // (dp * accumulation)
    dataset = PretokenizedDataset(IndexedDataset(pico_rows), SEQ)

    def documents_of_steps(consumed, micro_batch, ranks, steps):
        per_rank = [iter(PretrainingSampler(len(dataset), consumed, micro_batch, rank, ranks)) for rank in range(ranks)]
        return [sorted(index for _ in range(GLOBAL // (micro_batch * ranks)) for it in per_rank for index in next(it))
                for _ in range(steps)]

    assert documents_of_steps(0, micro, dp, 3) == [list(range(s * GLOBAL, (s + 1) * GLOBAL)) for s in range(3)]
    assert documents_of_steps(3 * GLOBAL, 4 // dp, dp, 1) == [list(range(12, 16))]  # resumed at step 3, GA 1
    assert np.array_equal(dataset[5], IndexedDataset(pico_rows)[5])


def test_rows_of_another_length_or_a_blend_are_one_line_errors(pico_rows, sample_prefix):
    with pytest.raises(DataError, match=r"document 0 has \d+ tokens, but data.samples=pretokenized needs every "
                                        r"document to be data.seq_len \+ 1 = 65"):
        PretokenizedDataset(IndexedDataset(pico_rows), 64)
    config = load_config(None, pico_overrides(pico_rows, Path("/tmp"), **{
        "data.train_data_path": f"[0.5,{pico_rows},0.5,{sample_prefix}]"}))
    with pytest.raises(DataError, match="not a weighted blend"):
        build_train_dataset(config.data, 10)


def test_a_run_longer_than_the_rows_stops_before_step_1(pico_rows, tmp_path):
    with pytest.raises(Exception, match=r"120 rows cover 30 steps of global batch 4, but training.max_steps=31"):
        train(1, pico_overrides(pico_rows, tmp_path, **{"training.max_steps": 31}), tmp_path)


def _plain_pico_loop(config, rows, steps, save_at=None):
    """pico-train's loop in plain torch: seed 42 init, AdamW + the schedule, each step the next G rows in order,
    each sub-batch's mean loss / accumulation backpropagated. save_at=(step, directory): also write a pico-train
    one-device checkpoint there after that step (HF files + fabric_state/checkpoint.pt, pico's keys)."""
    torch.manual_seed(config.training.seed)
    model = PicoDecoder(config.model)
    train_config = config.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay,
                                  betas=(train_config.adam_beta1, train_config.adam_beta2), eps=train_config.adam_eps)
    scheduler = build_lr_scheduler(optimizer, train_config)
    losses = {}
    for step in range(1, steps + 1):
        batch = torch.from_numpy(np.stack([rows[i] for i in range((step - 1) * GLOBAL, step * GLOBAL)])).long()
        total = 0.0
        for sub in batch.split(GLOBAL // 2):
            loss = model(sub[:, :-1], sub[:, 1:]) / 2
            loss.backward()
            total += loss.item()
        losses[step] = total
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if save_at and step == save_at[0]:
            _write_pico_train_checkpoint(save_at[1], config, model, optimizer, scheduler, step)
    return losses, model.state_dict()


def _write_pico_train_checkpoint(directory, config, model, optimizer, scheduler, step):
    from megapico.convert.hf_export import write_pico_hf

    write_pico_hf(model.state_dict(), config.model, str(TOKENIZER), directory, batch_size=GLOBAL)
    (directory / "fabric_state").mkdir()
    torch.save({"_model": model.state_dict(), "_optimizer": optimizer.state_dict(),
                "_lr_scheduler": scheduler.state_dict(), "_checkpoint_step": step, "_rng_states": {}},
               directory / "fabric_state" / "checkpoint.pt")


def test_pretokenized_training_is_the_plain_loop_at_any_layout_and_across_resume(pico_rows, paloma_texts, tmp_path):
    """Losses equal a plain torch loop over the rows in order at DP=1 x GA=2, and across a stop at DP=2 x GA=1
    resumed at TP=2 x GA=2; pico's Paloma (evaluated at steps 3 and 5) is the same number at DP=2 and at TP=2."""
    paloma = {"evaluation.perplexity": "pico", "data.eval_data_path": f"[{paloma_texts[0]}]",
              "evaluation.interval": 3}
    settings = pico_overrides(pico_rows, tmp_path / "one", **paloma)
    config = load_config(None, settings)
    expected, _ = _plain_pico_loop(config, IndexedDataset(pico_rows), STEPS)
    one = train(1, settings, tmp_path)
    assert one["losses"].keys() == expected.keys()
    assert all(abs(one["losses"][s] - expected[s]) < 1e-5 for s in expected), (one["losses"], expected)
    # DP=2 without accumulation stops at step 3; TP=2 x DP=1 with accumulation 2 resumes it
    stopped = pico_overrides(pico_rows, tmp_path / "two", **paloma, **{"training.gradient_accumulation_steps": 1,
                                                                       "training.exit_interval": 3})
    first = train(2, stopped, tmp_path)
    resumed = train(2, pico_overrides(pico_rows, tmp_path / "two", **paloma, **{"parallel.tensor_parallel_size": 2}),
                    tmp_path)
    assert resumed["resumed_from"] == 3
    both = {**first["losses"], **resumed["losses"]}
    assert all(abs(both[s] - expected[s]) < 1e-5 for s in expected), (both, expected)
    assert sorted(one["perplexities"]) == [3, 5]
    assert first["perplexities"][3] == pytest.approx(one["perplexities"][3], rel=1e-5)  # DP=2
    assert resumed["perplexities"][5] == pytest.approx(one["perplexities"][5], rel=1e-5)  # TP=2


def _hf_evaluate_perplexity(model_dir, texts, max_length):
    """HF evaluate's perplexity metric (add_start_token=False, max_length) as pico-train calls it, written out
    with transformers: per text exp(mean NLL of its first max_length tokens), then the mean over texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    perplexities, ids_seen = [], []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False, truncation=True,
                                      max_length=max_length)["input_ids"]])
        ids_seen.append(ids[0].tolist())
        with torch.no_grad():
            logits = model(ids).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        perplexities.append(torch.exp(nll.mean()).item())
    return float(np.mean(perplexities)), ids_seen


def test_pico_perplexity_equals_hf_evaluate_on_the_hf_export(paloma_texts, tmp_path):
    from megapico.convert.hf_export import write_pico_hf

    prefix, texts = paloma_texts
    config = load_config(None, ["model_preset=tiny", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=64"])
    torch.manual_seed(0)
    model = PicoDecoder(config.model, loss_chunk_tokens=100)
    write_pico_hf(model.state_dict(), config.model, str(TOKENIZER), tmp_path / "hf", batch_size=4)
    expected, ids_seen = _hf_evaluate_perplexity(tmp_path / "hf", texts, 64)
    documents = TextDocuments(IndexedDataset(prefix), 64, "evaluation")
    assert [documents[i].tolist() for i in range(len(documents))] == ids_seen  # no start token, first 64 tokens
    assert len(set(documents.lengths.tolist())) > 10  # many lengths: batches mix them, padding masked out
    ours = evaluate_text_perplexity(model, documents, tokens_per_batch=200, parallel=ParallelState())
    assert ours == pytest.approx(expected, rel=1e-6)
    plain_mean_token_ppl = np.exp(np.mean(np.concatenate([  # what evaluation.perplexity=tokens would report
        torch.nn.functional.cross_entropy(model(torch.tensor([ids[:-1]])).squeeze(0), torch.tensor(ids[1:]),
                                          reduction="none").detach().numpy() for ids in ids_seen])))
    assert abs(ours - plain_mean_token_ppl) / ours > 1e-3


def _text_perplexity_over_dp(rank, world_size, config_model, prefix):
    torch.manual_seed(0)
    model = PicoDecoder(config_model)
    parallel = ParallelState.build(1)  # DP = world_size
    return evaluate_text_perplexity(model, TextDocuments(IndexedDataset(prefix), 64, "evaluation"), 200, parallel)


def test_pico_perplexity_split_over_dp_and_its_config_error(paloma_texts, tmp_path):
    from megapico.training.trainer import build_eval_dataset

    config = load_config(None, ["model_preset=tiny", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=64",
                                "evaluation.perplexity=pico"])
    torch.manual_seed(0)
    single = evaluate_text_perplexity(PicoDecoder(config.model), TextDocuments(IndexedDataset(paloma_texts[0]), 64,
                                                                               "evaluation"), 200, ParallelState())
    split = run_distributed(_text_perplexity_over_dp, 2, config.model, paloma_texts[0], tmp_path=tmp_path)
    assert split == pytest.approx(single, rel=1e-7)  # two ranks, one thread each: another summation order
    with pytest.raises(ConfigError, match="evaluation.perplexity=pico scores every document of one prefix"):
        build_eval_dataset(config)


def _split_capture(rank, world_size, config_model, sequences):
    torch.manual_seed(0)
    model = PicoDecoder(config_model)
    return capture_learning_dynamics(model, sequences, micro_batch_size=2, dp_group=torch.distributed.group.WORLD)


def test_learning_dynamics_split_over_dp_equals_one_process_and_a_plain_pass(tmp_path):
    """Val sequences of many lengths, each at its own length, captured over 2 DP ranks (rows and gradients summed
    onto DP rank 0) equal one process, which equals plain autograd: the gradient of the mean token loss over all
    sequences, each sequence's output at its own last position."""
    config = load_config(None, ["model_preset=tiny", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=64",
                                "model.vocab_size=512"]).model
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, 512, length) for length in (9, 17, 17, 5, 33, 9, 17, 2)]
    split = run_distributed(_split_capture, 2, config, sequences, tmp_path=tmp_path)
    torch.manual_seed(0)
    model = PicoDecoder(config)
    single = capture_learning_dynamics(model, sequences, micro_batch_size=2)
    modules = dict(model.named_modules())
    names = list(single["activations"])
    outputs = {name: [] for name in names}
    handles = [modules[name].register_forward_hook(
        lambda module, inputs, out, name=name: outputs[name].append(out[0, -1].detach())) for name in names]
    total = sum(len(s) - 1 for s in sequences)
    model.zero_grad()
    for sequence in sequences:
        tokens = torch.from_numpy(sequence).long().unsqueeze(0)
        (model(tokens[:, :-1], tokens[:, 1:]) * ((len(sequence) - 1) / total)).backward()
    for handle in handles:
        handle.remove()
    for name in names:
        torch.testing.assert_close(single["activations"][name], torch.stack(outputs[name]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(single["gradients"][name], modules[name].weight.grad, atol=1e-7, rtol=1e-5)
        for kind in ("activations", "weights", "gradients"):
            torch.testing.assert_close(split[kind][name], single[kind][name], atol=1e-7, rtol=1e-5)


def test_lightning_deepspeed_bf16_is_deepspeeds_bf16_with_its_defaults(sample_prefix):
    from megapico.training.deepspeed_config import build_deepspeed_config, masters_from_fp32_init, use_bf16

    config = load_config(None, overrides(sample_prefix, Path("/tmp"),
                                         **{"training.precision": "lightning-deepspeed-bf16"}))
    ds = build_deepspeed_config(config, dp_size=2)
    assert ds["bf16"]["enabled"] and not ds["torch_autocast"]["enabled"]
    assert "data_types" not in ds and "communication_data_type" not in ds  # DeepSpeed's defaults, as Lightning
    assert use_bf16(config) and not masters_from_fp32_init(config)
    ours = load_config(None, overrides(sample_prefix, Path("/tmp"), **{"training.precision": "bf16"}))
    assert masters_from_fp32_init(ours)
    assert build_deepspeed_config(ours, 2)["data_types"] == {"grad_accum_dtype": "fp32"}
    stated = Path("/tmp") / "stated_dtypes.json"
    stated.write_text(json.dumps({"communication_data_type": "fp32", "zero_optimization": {"stage": 2}}))
    config.training.deepspeed_config = str(stated)
    with pytest.raises(ConfigError, match="communication_data_type=\"fp32\" replaces DeepSpeed's default"):
        build_deepspeed_config(config, 2)


def test_preprocess_reads_the_hf_cache_snapshot_and_a_saved_dataset_in_row_order(pico_rows, tmp_path):
    """The same rows from a `huggingface-cli download` cache folder (snapshot files are symlinks into blobs/) and
    from a datasets save_to_disk directory of input_ids rows as from the plain download."""
    import datasets

    expected = IndexedDataset(pico_rows).token_stream()
    download = Path(pico_rows).parent / "download" / "data"
    cache = tmp_path / "datasets--pico-lm--pretokenized-dolma"
    (cache / "snapshots" / "0123abc" / "data").mkdir(parents=True)
    (cache / "blobs").mkdir()
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abc")
    for index, parquet in enumerate(sorted(download.iterdir())):
        blob = cache / "blobs" / f"blob{index}"
        shutil.copyfile(parquet, blob)
        (cache / "snapshots" / "0123abc" / "data" / parquet.name).symlink_to(blob)
    rows = [row for parquet in sorted(download.iterdir()) for row in pq.read_table(parquet)["input_ids"].to_pylist()]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "saved"))
    for name, source in (("cache", cache), ("saved", tmp_path / "saved")):
        preprocess(PreprocessOptions(input=str(source), output_prefix=str(tmp_path / name), json_keys=["input_ids"],
                                     vocab_size=50304))
        built = IndexedDataset(tmp_path / f"{name}_input_ids_document")
        assert len(built) == 120 and np.array_equal(built.token_stream(), expected), name


def _as_lightning_deepspeed(rank, world_size, settings, one_device, fabric):
    """A ZeRO-2 engine on `world_size` gloo ranks holding a one-device pico-train state, saved as Lightning's
    DeepSpeed strategy saves (engine.save_checkpoint with its client state, tag "checkpoint", then `latest`)."""
    from megapico.checkpoint.reshard import load_full_state_into_engine
    from megapico.convert.from_pico_train import read_pico_train_checkpoint
    from megapico.training.trainer import build_engine

    state = read_pico_train_checkpoint(one_device)
    engine, scheduler = build_engine(load_config(None, settings), ParallelState.build(1))
    load_full_state_into_engine(engine, state.full, 0, 1)
    engine.save_checkpoint(str(fabric), tag="checkpoint", save_latest=True,
                           client_state={"_lr_scheduler": scheduler.state_dict(), "_checkpoint_step": state.step})
    return engine.bfloat16_enabled()


@pytest.fixture(scope="module")
def pico_train_step_3(pico_rows, tmp_path_factory):
    """A pico-train one-device checkpoint of step 3 and the uninterrupted plain loop's 5 losses."""
    tmp = tmp_path_factory.mktemp("pico-train")
    config = load_config(None, pico_overrides(pico_rows, tmp))
    losses, final = _plain_pico_loop(config, IndexedDataset(pico_rows), STEPS, save_at=(3, tmp / "step_3"))
    return tmp / "step_3", losses, final


def test_a_pico_train_checkpoint_continues_exactly_at_another_layout(pico_rows, pico_train_step_3, tmp_path):
    from convert_from_pico_train import main as convert

    checkpoint, expected, _ = pico_train_step_3
    settings = pico_overrides(pico_rows, tmp_path, **{"parallel.tensor_parallel_size": 2})
    assert convert([str(checkpoint), "--output", str(tmp_path / "runs" / "megapico-run"),
                    *[item for item in settings if not item.startswith("checkpointing.r")]]) == 0
    state = json.loads((tmp_path / "runs" / "megapico-run" / "checkpoints" / "step_3" / "megapico_state.json")
                       .read_text())
    assert (state["step"], state["consumed_samples"]) == (3, 3 * GLOBAL)
    continued = train(2, settings, tmp_path)  # TP=2, accumulation 2: resharded from the TP=1 import
    assert continued["resumed_from"] == 3 and sorted(continued["losses"]) == [4, 5]
    assert all(abs(continued["losses"][s] - expected[s]) < 1e-5 for s in (4, 5)), (continued["losses"], expected)


@pytest.mark.parametrize("ranks, precision", [(2, "fp32"), (4, "fp32"), (2, "lightning-deepspeed-bf16")])
def test_the_deepspeed_zero2_layout_imports_as_the_one_device_checkpoint(pico_rows, pico_train_step_3, tmp_path,
                                                                        ranks, precision):
    from megapico.convert.from_pico_train import read_pico_train_checkpoint

    one_device, _, _ = pico_train_step_3
    settings = pico_overrides(pico_rows, tmp_path, **{"training.precision": precision,
                                                      "training.micro_batch_size": GLOBAL // ranks,
                                                      "training.gradient_accumulation_steps": 1})
    deepspeed_dir = tmp_path / "step_3"
    shutil.copytree(one_device, deepspeed_dir, ignore=shutil.ignore_patterns("fabric_state"))
    bf16 = run_distributed(_as_lightning_deepspeed, ranks, settings, one_device, deepspeed_dir / "fabric_state",
                           tmp_path=tmp_path)
    prefix = "bf16_" if bf16 else ""
    assert bf16 == (precision != "fp32")
    assert sorted(p.name for p in (deepspeed_dir / "fabric_state" / "checkpoint").glob("*optim_states.pt")) == [
        f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(ranks)]
    ours, theirs = read_pico_train_checkpoint(deepspeed_dir), read_pico_train_checkpoint(one_device)
    assert ours.step == theirs.step == 3 and ours.layout.startswith(f"DeepSpeed ZeRO-2 of {ranks} ranks")
    for kind in ("weight", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(ours.full[kind][name], theirs.full[kind][name]) for name in theirs.full[kind]), kind
    (deepspeed_dir / "fabric_state" / "checkpoint" / f"{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"):
        read_pico_train_checkpoint(deepspeed_dir)


def test_bad_pico_train_checkpoints_are_one_line_errors_and_write_nothing(pico_rows, pico_train_step_3, tmp_path,
                                                                        capsys):
    from convert_from_pico_train import main as convert

    checkpoint, _, _ = pico_train_step_3
    settings = [item for item in pico_overrides(pico_rows, tmp_path) if not item.startswith("checkpointing.r")]
    output = tmp_path / "runs" / "imported"
    hf_only = tmp_path / "hf_only"
    shutil.copytree(checkpoint, hf_only, ignore=shutil.ignore_patterns("fabric_state"))
    scrambled = tmp_path / "scrambled"
    shutil.copytree(checkpoint, scrambled)
    state = torch.load(scrambled / "fabric_state" / "checkpoint.pt", weights_only=False)
    state["_model"] = dict(reversed(list(state["_model"].items())))  # another parameter order than the optimizer's
    torch.save(state, scrambled / "fabric_state" / "checkpoint.pt")
    cases = [
        (hf_only, settings, "neither checkpoint.pt (one device) nor DeepSpeed's 'latest'"),
        (scrambled, settings, "the parameter order is not pico's"),
        (checkpoint, [*settings, "training.lr=1e-3"], "pico-train's AdamW has lr=0.003"),
        (checkpoint, [*settings, "model.n_layers=4"], "model.n_layers=4 but the pico-train checkpoint has 2"),
        # a recipe of longer sequences than the checkpoint's model: refused before anything is written
        (checkpoint, [*[item for item in settings if not item.startswith("model")], "data.seq_len=2048"],
         "the imported run's config: data.seq_len=2048 exceeds model.max_seq_len=64"),
    ]
    for source, arguments, message in cases:
        assert convert([str(source), "--output", str(output), *arguments]) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and message in error and "\n" not in error, error
        assert not output.exists()
