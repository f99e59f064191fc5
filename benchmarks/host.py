"""What a CPU benchmark's timings depend on besides the code: threads, the torch build and the allocator."""

import os

import torch


def cpu_run_settings() -> str:
    """Threads, torch version and the malloc settings in force, for a benchmark's header line.

    glibc's malloc maps each large tensor fresh and unmaps it when it is freed, so a step that allocates big
    buffers page-faults them back in (and the kernel zeroes them) every time: pico-train's fp32 logits, a plain
    model's score matrices. MALLOC_* settings (mallopt(3)) or an LD_PRELOADed allocator change that, and with it
    the ratio against a peer that allocates more or less than megapico (benchmarks/RESULTS.md, Step efficiency)."""
    allocator = " ".join(f"{name}={value}" for name, value in sorted(os.environ.items())
                         if name.startswith("MALLOC_") or name == "LD_PRELOAD") or "glibc malloc defaults"
    return f"threads={torch.get_num_threads()} torch {torch.__version__}; {allocator}"
