"""The one configuration tree of megapico: a dataclass per concern, a docstring under each field.

Every entry point (pretrain.py, tools/*) loads this tree through `megapico.config.load_config`, so a
value has one name, one type and one place where it is checked. Builders receive only their branch.
"""

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """pico-decoder shape. Field names are those of pico's config.json, so the two convert 1:1."""

    d_model: int = 96
    """Hidden size; head_dim = d_model / attention_n_heads."""
    n_layers: int = 12
    attention_n_heads: int = 12
    attention_n_kv_heads: int = 4
    """Key/value heads (GQA): query head h reads kv head h // (n_heads / n_kv_heads)."""
    activation_hidden_dim: int = 384
    """SwiGLU hidden units (w_0, w_1: [hidden, d_model])."""
    vocab_size: int = 50304
    """Padded vocabulary (pico's tokenizer has 50280 tokens). Pinned here, never derived from the TP size."""
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    position_emb_theta: float = 10000.0


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks that split every layer (Megatron TP). Data parallelism is world_size / tensor_parallel_size."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism at TP > 1: norms and the residual stream split over the TP ranks by token
    (all-gather before the column-parallel projections, reduce-scatter after the row-parallel ones); a no-op at
    TP=1. Same losses and gradients; activation memory of those parts / TP."""


@dataclass
class DataConfig:
    train_data_path: list[str] = field(default_factory=list)
    """Megatron form: ["PREFIX"] or ["0.3", "PREFIX_A", "0.7", "PREFIX_B"] (weight, prefix pairs) of .bin/.idx."""
    split: str = "969,30,1"
    """train,valid,test proportions of documents, applied to every prefix of train_data_path."""
    eval_data_path: list[str] = field(default_factory=list)
    """A separate held-out prefix for evaluation (pico's "paloma"); empty = the valid split."""
    seq_len: int = 2048
    """Tokens per training sequence (each sample reads seq_len + 1 tokens)."""
    tokenizer: str = ""
    """Tokenizer the data was built with (HF tokenizers JSON, HF directory or sentencepiece .model)."""
    seed: int = 1234
    """Seed of the document/sample shuffles."""
    cache_dir: str = ""
    """Where the sample-index .npy files go; empty = next to the data."""
    samples: str = "megatron"
    """megatron (Megatron's shuffled GPT samples of seq_len + 1 tokens that may span documents) | pretokenized
    (pico-train's order: every document of train_data_path is one training sequence of exactly seq_len + 1 tokens,
    in document order, no shuffle and no split; step s trains documents [(s-1) G, s G) for global batch G)."""


@dataclass
class ActivationCheckpointingConfig:
    mode: str = "none"
    """none | full (recompute whole blocks; the fused loss head keeps no logits to recompute) | selective (recompute
    only the attention core)."""
    every_n_layers: int = 1
    """Checkpoint every N-th block (1 = all blocks)."""


@dataclass
class TrainingConfig:
    max_steps: int = 200_000
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    gradient_accumulation_steps: int = 1
    global_batch_size: int = 0
    """Sequences per optimizer step; must equal micro x accumulation x DP (0 = derive it)."""
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_steps: int = 2500
    lr_decay_style: str = "linear"
    """linear (pico) | cosine; decays from lr to min_lr at max_steps."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    gradient_clipping: float = 0.0
    """0 = no clipping (pico's recipe)."""
    precision: str = "auto"
    """bf16-mixed (pico-train's one-device numerics, Lightning's bf16-mixed: fp32 weights, gradients and optimizer,
    bf16 autocast for the matmuls) | bf16 (DeepSpeed's bf16 engine with pico's fp32 init in the masters and fp32
    gradient accumulation and reduction) | lightning-deepspeed-bf16 (exactly what pico-train's multi-GPU runs, the
    published ones included, execute: Lightning's DeepSpeed strategy turns bf16-mixed into DeepSpeed's
    "bf16": {"enabled": true} with no autocast, masters taken from the bf16-cast module, DeepSpeed's default
    gradient accumulation and reduction dtypes) | fp32 | auto (bf16-mixed on CUDA, fp32 on CPU)."""
    seed: int = 42
    """Seed of the weight initialisation (pico uses 42); identical on every rank so TP shards agree."""
    deepspeed_config: str = "ds_configs/zero2_cpu.json"
    """DeepSpeed JSON; batch sizes in it must agree with the values above."""
    exit_interval: int = 0
    """Save a checkpoint and stop once step % exit_interval == 0 (time-limited jobs; Megatron's --exit-interval)."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk of the fused linear + cross-entropy head: one [chunk, vocab/TP] fp32 logits block at a time."""
    compile: bool = False
    """torch.compile each decoder block (torchtitan's per-block compile); the recipes turn it on for GPUs."""
    nan_policy: str = "stop"
    """stop (raise naming the step) | skip (drop the update and go on) on a NaN/inf loss."""
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)
    change_schedule_on_resume: bool = False
    """Let a resume change max_steps or the LR schedule from the checkpoint's run (the schedule is re-stretched from
    the resumed step on); without it such a change is refused with one line saying what would change."""


@dataclass
class EvaluationConfig:
    interval: int = 1000
    """Evaluate every N steps (and at the end); 0 = only at the end."""
    max_sequences: int = 0
    """Sequences (seq_len samples, or texts for perplexity=pico) per evaluation, for the whole run: the first N of
    the eval set, split over the DP ranks, so every layout and every resume scores the same set; 0 (or more than
    the set holds) = the whole eval set. Counted in sequences, not in Megatron's --eval-iters global batches, so
    the set stays the same when the global batch changes (Megatron's eval_iters x global_batch_size = this)."""
    name: str = "valid"
    """Key of the perplexity in eval_results/step_N.json and wandb (eval/<name>): name the set it measures (pico's
    recipes: paloma for pico's Paloma texts; the default eval set is the train prefix's valid split)."""
    perplexity: str = "tokens"
    """tokens (exp of the mean token NLL over seq_len samples of the eval set) | pico (pico-train's Paloma: each
    document of the eval prefix is one text, its first model.max_seq_len tokens scored with no start token,
    the reported value the mean over texts of exp(mean NLL): HF evaluate's perplexity, add_start_token=False)."""


@dataclass
class LearningDynamicsConfig:
    """pico-train's learning dynamics: at step_N the train split is the whole global batch that step N + 1 trains;
    the val split is every sequence of eval_data_path (else the first batch_size samples of the eval set)."""

    enabled: bool = True
    batch_size: int = 256
    """Val sequences taken from the eval set when eval_data_path is empty (pico-analyze's pwcca wants more than
    d_model). The train split is always the next global batch."""
    micro_batch_size: int = 4
    """Sequences per forward/backward of the capture on each DP rank: its activation memory, beside training's."""
    precision: str = "auto"
    """auto (the run's precision, as pico-train captures with its training module: bf16-mixed runs capture under
    bf16 autocast, the bf16 engines with a bf16 module, fp32 runs in fp32) | fp32 (exact: the same numbers on every
    machine; about 8x a bf16 capture's time on an A100) | bf16-mixed | bf16. Gradients are summed in fp32 and the
    saved tensors are fp32 in every precision."""
    eval_data_path: str = ""
    """A .bin/.idx prefix whose every document is one val sequence at its own length (pico's
    pretokenized-paloma-tinsy val rows, preprocessed with --json-keys input_ids); empty = the eval set."""
    analysis: str = ""
    """A pico-analyze metrics YAML (its own format: analysis_name, metrics) whose metrics are computed on every
    capture as the run goes, off the training path, into runs/RUN/analysis_results/ and the logs under pico-analyze's
    keys; checked against the run at launch, before any step trains. Empty = no analysis (the captures are only
    stored, for pico-analyze afterwards)."""
    analysis_device: str = "cpu"
    """Where the analysis computes (its own background process beside rank 0): cpu (the default: pico-analyze's own
    path, the same numbers bit for bit, and no GPU time taken from training) | auto (rank 0's GPU where it trains on
    one, within a 4 GiB budget, else the host CPU: for configs too heavy for the host to keep up with, at the price
    of GPU time shared with rank 0's training) | cuda. On a GPU every metric equals pico-analyze's to rounding
    except condition_number of a rank-deficient matrix (ov_circuit's), whose smallest singular value is the SVD
    driver's rounding noise there and here."""
    interval: int = 0
    """Also capture every N steps without a checkpoint, for the analysis only (nothing written but its results:
    storing learning dynamics is what checkpoints are for), so its curves are denser than the checkpoints; needs
    `analysis`. 0 = capture at step 0 and at checkpoints only."""
    wait_at_end_s: float = 300.0
    """At the end of training, how long to wait for the analysis still running (the run's lock gets no heartbeat
    meanwhile: at most 540); what is left is owed and completed by the next launch of the same command."""


@dataclass
class HfCheckpointConfig:
    """Where checkpointing.save_to_hf publishes the run (pico-train's names)."""

    repo_id: str = ""
    """The Hub model repository, ORG/NAME; the run is published on the branch named after checkpointing.run_name."""
    collection_slug: str = ""
    """A Hub collection to add the repository to (empty: none)."""
    private: bool = True
    """Create the repository private (a run is published only where its owner chose; false: public, as pico-lm's)."""
    training_state: str = "last"
    """Which checkpoints also publish megapico's training state (DeepSpeed files, under megapico_state/, which a
    download of the branch resumes from): every | last (only the newest; large's optimizer state is gigabytes per
    checkpoint) | never."""
    wait_at_end_s: float = 600.0
    """At the end of training, how long to wait for pending uploads before exiting (the log says what is left;
    tools/publish_run.py completes it later)."""
    retries: int = 5
    """Attempts per upload (exponential backoff between them) before a warning; the next checkpoint tries again."""


@dataclass
class CheckpointingConfig:
    run_name: str = "megapico-run"
    runs_dir: str = "runs"
    save_interval: int = 1000
    resume: str = "auto"
    """auto (latest, or the newest earlier checkpoint that verifies; fresh when there is none) | true (latest must
    verify) | step_N (that checkpoint) | false (start fresh)."""
    keep_last: int = 0
    """Keep the full DeepSpeed state of only the newest K checkpoints (0 = all); older ones keep a verified HF export
    and their learning dynamics (megapico/convert/retention.py), so the pico run directory still has every step."""
    verify: str = "hash"
    """How checkpoints are checked against their manifest before loading: hash (sizes + sha256) | size (sizes only,
    for very large runs)."""
    learning_dynamics: LearningDynamicsConfig = field(default_factory=LearningDynamicsConfig)
    save_to_hf: bool = False
    """Publish every checkpoint to the Hugging Face Hub as pico-train does (hf_checkpoint), from one rank in the
    background: a slow or failing Hub never stalls or stops training."""
    hf_checkpoint: HfCheckpointConfig = field(default_factory=HfCheckpointConfig)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    wandb_mode: str = "offline"
    """offline (files in the run directory) | online | disabled."""
    wandb_project: str = "megapico"
    wandb_entity: str = ""


@dataclass
class MegapicoConfig:
    model_preset: str = ""
    """tiny | small | medium | large: fills `model` before YAML/CLI values for it are applied."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
