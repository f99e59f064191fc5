"""Rank 0's one-line log records, eval_results/step_N.json, and wandb (offline files in the run dir by default).

wandb metric names follow pico-train: train/loss, trainer/learning_rate, eval/<eval name>.
"""

import dataclasses
import json
from pathlib import Path

import torch.distributed as dist

from megapico.config import MegapicoConfig
from megapico.parallel import ParallelState
from megapico.training.metrics import peak_memory_gib, peak_tflops_per_device


class RunLogger:
    def __init__(self, config: MegapicoConfig, run_dir: Path, parallel: ParallelState, flops_per_step: float) -> None:
        self.is_writer = dist.get_rank() == 0
        self.config, self.run_dir = config, run_dir
        self.flops_per_step, self.world = flops_per_step, dist.get_world_size()
        self.tokens_per_step = config.training.micro_batch_size * config.training.gradient_accumulation_steps * \
            parallel.dp_size * config.data.seq_len
        self.peak = peak_tflops_per_device()
        self.window_seconds, self.window_steps = 0.0, 0
        self.wandb = None
        if self.is_writer and config.logging.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=config.logging.wandb_project, entity=config.logging.wandb_entity or None,
                                    name=config.checkpointing.run_name, dir=str(run_dir),
                                    mode=config.logging.wandb_mode, config=dataclasses.asdict(config))

    def log_step(self, step: int, loss: float, lr: float, grad_norm: float, seconds: float, consumed: int) -> None:
        self.window_seconds += seconds
        self.window_steps += 1
        if self.wandb is not None:
            self.wandb.log({"train/loss": loss, "trainer/learning_rate": lr, "trainer/grad_norm": grad_norm,
                            "trainer/consumed_samples": consumed}, step=step)
        if not self.is_writer or (step % self.config.logging.log_interval and step != self.config.training.max_steps):
            return
        step_seconds = self.window_seconds / self.window_steps
        tflops = self.flops_per_step / step_seconds / self.world / 1e12
        mfu = f"{100 * tflops / self.peak:.1f}%" if self.peak else "n/a"
        print(f"step {step}/{self.config.training.max_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm "
              f"{grad_norm:.3f} | {self.tokens_per_step / step_seconds:,.0f} tok/s | {tflops:.2f} TFLOP/s/device | "
              f"MFU {mfu} | peak mem {peak_memory_gib():.2f} GiB", flush=True)
        self.window_seconds, self.window_steps = 0.0, 0

    def log_eval(self, step: int, perplexity: float) -> None:
        if not self.is_writer:
            return
        name = self.config.evaluation.name
        print(f"step {step} | eval {name} perplexity {perplexity:.3f}", flush=True)
        results = self.run_dir / "eval_results"
        results.mkdir(parents=True, exist_ok=True)
        (results / f"step_{step}.json").write_text(json.dumps({name: perplexity}))
        if self.wandb is not None:
            self.wandb.log({f"eval/{name}": perplexity}, step=step)

    def warn(self, message: str) -> None:
        if self.is_writer:
            print(f"warning: {message}", flush=True)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
