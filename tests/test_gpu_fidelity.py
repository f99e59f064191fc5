"""What the 16 x A100 bf16 run depends on, proven on CPU: fp32 attention without a T x T matrix, a bounded
learning-dynamics capture, fp32 gradients under bf16, pico's exact fp32 init in bf16 runs, bf16-mixed, launcher
environments, cross-rank agreement and host syncs per step."""

import os
import subprocess
import sys
import textwrap
import traceback

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TOKENIZER
from conftest import training_overrides as overrides
from distributed import run_distributed, train

from megapico.config import ModelConfig, load_config
from megapico.model import PicoDecoder, pico_decoder
from megapico.model.pico_decoder import causal_attention, sdpa_reads_gqa
from megapico.parallel import LaunchError
from megapico.parallel.state import first_host, launcher_environment
from megapico.training.learning_dynamics import SUFFIXES, capture_learning_dynamics, probe_precision

SMALL = ModelConfig(d_model=48, n_layers=2, attention_n_heads=12, attention_n_kv_heads=4,
                    activation_hidden_dim=96, vocab_size=256, max_seq_len=64)


def test_attention_reads_gqa_in_the_kernel_or_expands_kv_and_equals_sdpa_with_gqa(monkeypatch):
    """CUDA fp32 (the memory-efficient kernel, no GQA; the learning-dynamics probe) gets k/v expanded to the query
    heads; CUDA bf16 and CPU in every dtype pass enable_gqa to the flash kernel. Same output either way."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 12, 16, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append((k.shape[1], kwargs.get("enable_gqa")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    for in_kernel in (True, False):
        monkeypatch.setattr(pico_decoder, "sdpa_reads_gqa", lambda device_type, dtype, in_kernel=in_kernel: in_kernel)
        torch.testing.assert_close(causal_attention(q, k, v), expected, atol=1e-6, rtol=0)
    assert calls == [(4, True), (12, False)]
    monkeypatch.undo()
    assert sdpa_reads_gqa("cpu", torch.float32) and sdpa_reads_gqa("cuda", torch.bfloat16)
    assert not sdpa_reads_gqa("cuda", torch.float32) and not sdpa_reads_gqa("mps", torch.bfloat16)


def _plain_capture(model, samples):
    """The spec, directly: one forward of the whole batch with full outputs kept, one backward."""
    outputs = {}
    modules = dict(model.named_modules())
    names = [f"layers.{i}.{suffix}" for i in range(model.config.n_layers) for suffix in SUFFIXES]
    handles = [modules[name].register_forward_hook(
        lambda module, inputs, output, name=name: outputs.__setitem__(name, output[:, -1].detach().clone()))
        for name in names]
    tokens = torch.from_numpy(samples).long()
    model.zero_grad()
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    for handle in handles:
        handle.remove()
    return {"activations": outputs, "weights": {n: modules[n].weight.detach() for n in names},
            "gradients": {n: modules[n].weight.grad for n in names}}


def test_capture_in_micro_batches_equals_one_pass_over_the_batch():
    torch.manual_seed(3)
    model = PicoDecoder(SMALL)
    samples = np.random.default_rng(0).integers(0, 256, (7, 17))
    ours = capture_learning_dynamics(model, samples, micro_batch_size=3)  # 3 + 3 + 1 sequences
    plain = _plain_capture(model, samples)
    for kind in ("activations", "weights", "gradients"):
        assert set(ours[kind]) == set(plain[kind])
        for name, tensor in plain[kind].items():
            assert ours[kind][name].dtype == torch.float32
            torch.testing.assert_close(ours[kind][name], tensor, atol=1e-6, rtol=1e-5, msg=f"{kind} {name}")


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_bf16_captures_are_the_training_modules_pass_with_gradients_summed_in_fp32(precision):
    """pico-train captures with its training module: a bf16 module under its DeepSpeed bf16 engine, the fp32 model
    under bf16 autocast on one device. In one micro batch the files are that plain pass's, bit for bit, stored as
    fp32; in three micro batches the gradients are summed in fp32 and stay within bf16 rounding of the fp32
    capture."""
    torch.manual_seed(3)
    model = PicoDecoder(SMALL)
    samples = np.random.default_rng(0).integers(0, 256, (7, 17))
    one_pass = capture_learning_dynamics(model, samples, micro_batch_size=7, precision=precision)
    if precision == "bf16":
        plain_model = PicoDecoder(SMALL).to(torch.bfloat16)
        plain_model.load_state_dict(model.state_dict())
        plain = _plain_capture(plain_model, samples)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = _plain_capture(model, samples)
    for kind in ("activations", "weights", "gradients"):
        for name, tensor in plain[kind].items():
            assert one_pass[kind][name].dtype == torch.float32
            torch.testing.assert_close(one_pass[kind][name], tensor.float(), atol=0, rtol=0, msg=f"{kind} {name}")
    in_micro_batches = capture_learning_dynamics(model, samples, micro_batch_size=3, precision=precision)
    fp32 = _plain_capture(model, samples)
    for name, gradient in fp32["gradients"].items():
        scale = gradient.abs().max()
        assert (in_micro_batches["gradients"][name] - gradient).abs().max() < 2e-2 * scale, name


def test_auto_capture_precision_is_the_runs():
    assert {run: probe_precision("auto", run) for run in ("fp32", "bf16-mixed", "bf16", "lightning-deepspeed-bf16")
            } == {"fp32": "fp32", "bf16-mixed": "bf16-mixed", "bf16": "bf16", "lightning-deepspeed-bf16": "bf16"}
    assert probe_precision("fp32", "lightning-deepspeed-bf16") == "fp32"


CAPTURE_MEMORY = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    from megapico.config import ModelConfig
    from megapico.model import PicoDecoder
    from megapico.training.learning_dynamics import capture_learning_dynamics
    torch.set_num_threads(1)
    config = ModelConfig(d_model=96, n_layers=4, attention_n_heads=4, attention_n_kv_heads=2,
                         activation_hidden_dim=384, vocab_size=1024, max_seq_len=256)
    torch.manual_seed(0)
    model = PicoDecoder(config)
    samples = np.random.default_rng(0).integers(0, 1024, (128, 257))
    micro = 8
    with torch.device("meta"):  # the probe is built on the meta device: pay its one-time imports (70 MB) in both
        PicoDecoder(config)
    if sys.argv[1] == "train":  # training forward + backward over the same tokens, micro batch by micro batch
        for start in range(0, len(samples), micro):
            tokens = torch.from_numpy(samples[start:start + micro]).long()
            model(tokens[:, :-1], tokens[:, 1:]).backward()
    else:
        capture_learning_dynamics(model, samples, micro)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def test_capture_memory_is_one_micro_batch_plus_the_kept_rows(tmp_path):
    """Peak RSS of a 128 x 256 capture in micro batches of 8 against training forward + backward passes over the
    same micro batches. Keeping views of whole outputs (the old hook) pinned 128 x 256 x 240 x 4 B x 4 layers =
    126 MB more; now the extra is the probe (weights + gradients, 7 MB) and the kept rows (0.5 MB)."""
    script = tmp_path / "capture_memory.py"
    script.write_text(CAPTURE_MEMORY)
    peaks = {}
    for mode in ("train", "capture"):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, cwd=REPO,
                             check=True)
        peaks[mode] = int(out.stdout.split()[-1])
    assert peaks["capture"] - peaks["train"] < 30 * 2**20, peaks


def _bf16_gradient_partition(rank, world_size, settings):
    """DP=2 x GA=2 under DeepSpeed's bf16 engine: the gradient Adam receives, and the fp32 sum of the bf16 micro
    gradients computed by a plain bf16 model with the same weights and batches (on this rank's thread count)."""
    from megapico.config import load_config
    from megapico.parallel import ParallelState
    from megapico.training.trainer import build_engine

    config = load_config(None, settings)
    parallel = ParallelState.build(1)
    engine, _ = build_engine(config, parallel)
    seen = []
    adam_step = engine.optimizer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.extend(p.grad.detach().clone() for group in engine.optimizer.optimizer.param_groups
                    for p in group["params"])
        return adam_step(*args, **kwargs)

    engine.optimizer.optimizer.step = recording_step
    bf16_weights = {name: p.detach().clone() for name, p in engine.module.named_parameters()}

    def batch(dp_rank, micro):
        generator = torch.Generator().manual_seed(100 * dp_rank + micro)
        return torch.randint(0, config.model.vocab_size, (2, 17), generator=generator)

    for micro in range(2):
        tokens = batch(rank, micro)
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        engine.step()
    partitions = [None] * world_size
    torch.distributed.all_gather_object(partitions, torch.cat([g.flatten() for g in seen]))
    reference = PicoDecoder(config.model).to(torch.bfloat16)
    reference.load_state_dict(bf16_weights)
    fp32_sum, bf16_sum = None, None
    for micro in range(2):  # DeepSpeed's order: each micro-step is reduced over DP, then accumulated
        reduced32, reduced16 = None, None
        for dp_rank in range(world_size):
            reference.zero_grad()
            tokens = batch(dp_rank, micro)
            (reference(tokens[:, :-1], tokens[:, 1:]) / 2).backward()  # engine.backward divides by GA
            grads = torch.cat([p.grad.flatten() for p in reference.parameters()])
            reduced32 = grads.float() / world_size if reduced32 is None else reduced32 + grads.float() / world_size
            reduced16 = grads / world_size if reduced16 is None else reduced16 + grads / world_size
        fp32_sum = reduced32 if fp32_sum is None else fp32_sum + reduced32
        bf16_sum = reduced16 if bf16_sum is None else bf16_sum + reduced16
    return dict(partitions=partitions, fp32_sum=fp32_sum, bf16_sum=bf16_sum.float())


def test_bf16_gradients_are_accumulated_and_reduced_in_fp32(sample_prefix, tmp_path):
    settings = overrides(sample_prefix, tmp_path, **{
        "training.precision": "bf16", "training.micro_batch_size": 2, "training.gradient_accumulation_steps": 2,
        "model.vocab_size": 512})
    result = run_distributed(_bf16_gradient_partition, 2, settings, tmp_path=tmp_path)
    assert all(p.dtype == torch.float32 for p in result["partitions"])
    reduced = torch.cat(result["partitions"])[:result["fp32_sum"].numel()]
    assert torch.equal(reduced, result["fp32_sum"])
    assert not torch.equal(reduced, result["bf16_sum"])  # bf16 accumulation would have given other numbers


def _gathered_masters(rank, world_size, settings):
    from megapico.checkpoint.reshard import gather_master_weights
    from megapico.parallel import ParallelState
    from megapico.training.trainer import build_engine

    engine, _ = build_engine(load_config(None, settings), ParallelState.build(1))
    weights = gather_master_weights(engine)
    held = [None] * world_size
    torch.distributed.all_gather_object(held, {key: value.clone() for key, value in weights.items()})
    return dict(held=held, weights=weights)


def test_master_weights_are_gathered_onto_every_dp_rank(sample_prefix, tmp_path):
    """bf16, DP=2: the learning-dynamics capture, split over DP, reads the same fp32 masters on every DP rank."""
    settings = overrides(sample_prefix, tmp_path, **{"training.precision": "bf16", "model.vocab_size": 512})
    result = run_distributed(_gathered_masters, 2, settings, tmp_path=tmp_path)
    first, second = result["held"]
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    torch.manual_seed(42)
    init = PicoDecoder(load_config(None, settings).model).state_dict()
    assert result["weights"].keys() == init.keys()
    assert all(torch.equal(result["weights"][key], init[key]) for key in init)


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_step_0_of_a_bf16_run_is_pico_fp32_init_exactly(sample_prefix, tmp_path, precision):
    """At DP=2 the checkpoint holds pico's fp32 init exactly; the capture, in the run's precision, reads the masters
    gathered onto every DP rank: the bf16 engine's probe holds them rounded to bf16 (the module pico-train's bf16
    engine captures with), bf16-mixed's the fp32 masters themselves."""
    from megapico.convert.checkpoint_reader import load_checkpoint

    train(2, overrides(sample_prefix, tmp_path, **{
        "training.precision": precision, "training.max_steps": 1, "training.lr_warmup_steps": 0,
        "checkpointing.learning_dynamics.enabled": True, "checkpointing.learning_dynamics.batch_size": 4}), tmp_path)
    config = load_config(None, overrides(sample_prefix, tmp_path))
    torch.manual_seed(42)
    init = PicoDecoder(config.model).state_dict()
    step_0 = tmp_path / "runs" / "megapico-run" / "checkpoints" / "step_0"
    saved = load_checkpoint(step_0).state_dict
    assert saved.keys() == init.keys()
    assert all(torch.equal(saved[key], init[key]) for key in init)
    weights = torch.load(step_0 / "learning_dynamics" / "train_weights.pt")
    probe_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert all(torch.equal(weights[name], init[f"{name}.weight"].to(probe_dtype).float()) for name in weights)


@pytest.fixture(scope="module")
def fp32_reference(sample_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp32")
    return train(1, overrides(sample_prefix, tmp), tmp)


def test_bf16_mixed_losses_follow_fp32(sample_prefix, tmp_path, fp32_reference):
    mixed = train(1, overrides(sample_prefix, tmp_path, **{"training.precision": "bf16-mixed"}), tmp_path)
    assert mixed["losses"].keys() == fp32_reference["losses"].keys()
    for step, loss in fp32_reference["losses"].items():
        assert abs(mixed["losses"][step] - loss) <= 0.02 * loss, (step, mixed["losses"][step], loss)
    assert mixed["losses"] != fp32_reference["losses"]  # autocast really ran the matmuls in bf16


def _matmul_dtypes_in_training(rank, world_size, settings):
    import megapico.training.trainer as trainer

    autocast_on = torch.is_autocast_enabled
    # torch.is_autocast_enabled() with no device asks about CUDA's autocast. Point it at the CPU's, so that the
    # nested-autocast check DeepSpeed's engine.forward makes sees here what it sees on a GPU.
    torch.is_autocast_enabled = lambda device_type="cpu": autocast_on(device_type)
    seen, build_engine = [], trainer.build_engine

    def build_and_watch(config, parallel):
        engine, scheduler = build_engine(config, parallel)
        engine.module.layers[0].attention.q_proj.register_forward_hook(
            lambda module, args, out: seen.append(out.dtype) if torch.is_grad_enabled() else None)
        engine.module.de_embedding_proj.weight.register_hook(lambda grad: seen.append(("grad", grad.dtype)))
        return engine, scheduler

    trainer.build_engine = build_and_watch
    trainer.pretrain(load_config(None, settings))
    return seen


def test_bf16_mixed_trains_in_bf16_where_deepspeed_checks_the_autocast(sample_prefix, tmp_path):
    """On a GPU, DeepSpeed's forward turned off an autocast entered around it (no torch_autocast in its config):
    bf16-mixed ran the whole model in fp32, 2.6x slower on an H200. The engine now enters autocast itself; its
    matmuls run in bf16 and the gradients it reduces stay fp32."""
    settings = overrides(sample_prefix, tmp_path, **{"training.precision": "bf16-mixed", "training.max_steps": 2})
    seen = run_distributed(_matmul_dtypes_in_training, 1, settings, tmp_path=tmp_path)
    assert seen == [torch.bfloat16, ("grad", torch.float32)] * 2, seen


def test_launcher_environments():
    assert first_host("gpu[007-010,12],cpu1") == "gpu007" and first_host("node-a,node-b") == "node-a"
    assert first_host("dgx01") == "dgx01"
    assert launcher_environment({"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "h"}) == {}
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "a100-[03-04]", "SLURM_JOB_ID": "123456"}
    assert launcher_environment(slurm) == dict(RANK="9", WORLD_SIZE="16", LOCAL_RANK="1", MASTER_ADDR="a100-03",
                                               MASTER_PORT=str(20000 + 123456 % 20000))
    ompi = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
            "MASTER_ADDR": "node-a"}
    assert launcher_environment(ompi) == dict(RANK="5", WORLD_SIZE="16", LOCAL_RANK="5", MASTER_ADDR="node-a",
                                              MASTER_PORT="29500")
    with pytest.raises(LaunchError, match="Open MPI sets no rendezvous address"):
        launcher_environment({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    for env in ({"PMI_RANK": "1", "PMI_SIZE": "4"}, {"WORLD_SIZE": "4"}):
        with pytest.raises(LaunchError, match="RANK/WORLD_SIZE are not both set"):
            launcher_environment(env)
    # an sbatch script's own shell (no srun step) running plain python is one process
    alone = launcher_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"})
    assert (alone["RANK"], alone["WORLD_SIZE"]) == ("0", "1")


def test_pretrain_under_mpich_is_a_one_line_error(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "model_preset=tiny"], cwd=REPO,
                         capture_output=True, text=True, env={**env, "PMI_RANK": "1", "PMI_SIZE": "2"})
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: PMI_RANK is set but RANK/WORLD_SIZE are not both set")


def _two_nodes(rank, world_size, prefix, tmp, seeds):
    """Two ranks on two 'nodes' (LOCAL_RANK 0 each) whose cache dirs are node-local, i.e. not shared."""
    from megapico.data.gpt_dataset import GPTDataset
    from megapico.data.indexed_dataset import IndexedDataset

    os.environ["LOCAL_RANK"] = "0"
    try:
        dataset = GPTDataset(IndexedDataset(prefix), "train", 40, 16, seeds[rank], cache_dir=f"{tmp}/node{rank}")
    except LaunchError as err:
        return f"error: {err}"
    rows = [None] * world_size
    torch.distributed.all_gather_object(rows, (dataset.build_seconds > 0, np.asarray(dataset.shuffle_index).tolist()))
    return rows


def test_node_local_caches_are_built_per_node_and_compared(sample_prefix, tmp_path):
    rows = run_distributed(_two_nodes, 2, sample_prefix, str(tmp_path), (3, 3), tmp_path=tmp_path)
    assert [built for built, _ in rows] == [True, True] and rows[0][1] == rows[1][1]
    error = run_distributed(_two_nodes, 2, sample_prefix, str(tmp_path / "mismatch"), (3, 4), tmp_path=tmp_path)
    assert error.startswith("error: ranks disagree on the sample index") and "rank 1 has fingerprint" in error


def _resume_points(rank, world_size, settings_per_rank):
    from megapico.checkpoint.training_state import agreed_resume_point

    try:
        point = agreed_resume_point(load_config(None, settings_per_rank[rank]))
    except LaunchError as err:
        return f"error: {err}"
    return point.tag if point else None


def test_ranks_that_see_different_checkpoints_stop_together(sample_prefix, tmp_path):
    train(1, overrides(sample_prefix, tmp_path / "node0", **{"training.max_steps": 1, "training.lr_warmup_steps": 0}),
          tmp_path)
    settings = [overrides(sample_prefix, tmp_path / f"node{rank}") for rank in range(2)]  # node1 has no checkpoint
    error = run_distributed(_resume_points, 2, settings, tmp_path=tmp_path)
    assert error == (f"error: ranks disagree on the checkpoint to resume from in {tmp_path / 'node0' / 'runs'}/"
                     f"megapico-run/checkpoints (checkpointing.runs_dir must be on a filesystem that every node "
                     f"shares): rank 0 has step_1, rank 1 has none")
    assert run_distributed(_resume_points, 2, [settings[0], settings[0]], tmp_path=tmp_path) == "step_1"


def _count_host_syncs(rank, world_size, settings):
    """Tensor -> host reads (item, tolist, bool, float, int) during a whole run, and whether TP=1 has no group."""
    from megapico.training import trainer

    counts = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            # torch.optim.AdamW reads its `step` counter, a CPU tensor on GPUs too (no device sync there)
            if "torch/optim/" not in traceback.extract_stack(limit=2)[0].filename:
                counts["n"] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counting)
    engines = []
    build = trainer.build_engine
    trainer.build_engine = lambda config, parallel: engines.append(build(config, parallel)) or engines[-1]
    trainer.pretrain(load_config(None, settings))
    return dict(syncs=counts["n"], tp_group=engines[0][0].module.tp_group)


def test_one_host_sync_per_step(sample_prefix, tmp_path):
    """Two runs that differ only in length (log, eval and save only at their last step): the extra steps
    cost exactly one host sync each, DeepSpeed's check of the gradient norm before the update."""
    counts = {}
    for steps in (3, 6):
        settings = overrides(sample_prefix, tmp_path / str(steps), **{
            "training.max_steps": steps, "training.gradient_accumulation_steps": 2, "training.micro_batch_size": 2,
            "logging.log_interval": 1000, "data.tokenizer": str(TOKENIZER)})
        counts[steps] = run_distributed(_count_host_syncs, 1, settings, tmp_path=tmp_path)
    assert counts[3]["tp_group"] is None  # TP=1: no size-1 group inside the model
    assert (counts[6]["syncs"] - counts[3]["syncs"]) / 3 == 1, counts


def test_gpu_check_script_refuses_without_cuda():
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("error: no CUDA device visible; scripts/gpu_check.sh needs 1..8 "
                                                   "local GPUs (run the CPU suite with scripts/test.sh)")
