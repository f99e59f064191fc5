"""How long megapico's pico-analyze metrics (megapico/analysis) take on one capture: measured on this CPU at tiny
and small, and a FLOP model for large (d_model 1536, 12 heads, 4 kv heads, 12 layers, 1024 train sequences)
with an estimate for one A100.

The config is tests/pico_analyze_reference.py's every-metric config (all metrics, every layer, on swiglu.w_2,
attention.v_proj and ov_circuit, each data type they allow, frobenius norm), with pwcca on the simple components
only (pwcca on ov_circuit wants more sequences than heads x d_model). Inputs are random fp32 tensors of the
capture's shapes (the metrics' cost does not depend on the values).

FLOP model, per component matrix [m, n], k = min(m, n): an SVD with vectors (per, condition_number, nuclear norm:
pico-analyze's torch.svd) 4 m n k + 22 k^3, one per matrix for per and condition_number together (the analysis
shares it); cka's two Gram matrices 2 * 2 m^2 n when m < n (else the three
feature products 2 m n^2 each); pwcca's covariance 2 m (2n)^2, two pinv + eigh + one svd ~ 60 n^3, QR 4 m n^2;
ov_circuit's products 2 m k n per head; elementwise metrics (gini's sort, hoyer, frobenius, inf) ~ 0.
A100 (the worker on rank 0's GPU, analysis_device auto): products in fp64 at 9.7 TFLOP/s (no tensor cores
assumed); the SVDs (fp32) and pwcca's pinv/eigh/svd (fp64) half matrix-vector work, bound by 1.5 TB/s at 2 flops per
element read, half matrix-matrix at half the peak (19.5 TFLOP/s fp32, 9.7 fp64): 1.39 TFLOP/s fp32, 0.70 fp64;
and, as a pessimistic bound, every one at 0.5 TFLOP/s.
Usage: python benchmarks/bench_analysis.py [--sequences 256] [--presets tiny small]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pico_analyze_reference import SUFFIXES, every_metric_configs  # noqa: E402

from megapico.analysis import analyze  # noqa: E402
from megapico.analysis.spec import AnalysisSpec, MetricSpec, parse_analysis  # noqa: E402
from megapico.config import MODEL_PRESETS, ModelConfig  # noqa: E402

A100_FP64 = 9.7e12  # fp64 without tensor cores (cka, pwcca's products)
A100_FP32 = 19.5e12
A100_BYTES_S = 1.5e12  # HBM2e, the low end of 1.5-2 TB/s
A100_SVD_BOUND = 0.5e12  # a pessimistic sustained rate for cuSOLVER's fp32 SVD on 1-2k matrices


def spec_for(model: ModelConfig) -> AnalysisSpec:
    raw = every_metric_configs(list(range(model.n_layers)), "train", 1, comparative_split="train")[0]
    for metric in raw["metrics"]:
        if metric["metric_name"] == "pwcca":
            metric["components"] = [c for c in metric["components"] if c["component_name"] == "simple"]
    return parse_analysis(raw, "bench")


def capture(model: ModelConfig, sequences: int, generator: torch.Generator) -> dict:
    head_dim = model.d_model // model.attention_n_heads
    shapes = {"attention.v_proj": (head_dim * model.attention_n_kv_heads, model.d_model),
              "attention.o_proj": (model.d_model, model.d_model),
              "swiglu.w_2": (model.d_model, model.activation_hidden_dim)}
    names = [(f"layers.{i}.{s}", s) for i in range(model.n_layers) for s in SUFFIXES]
    kinds = {"activations": {k: torch.randn(sequences, shapes[s][0], generator=generator) for k, s in names},
             "weights": {k: torch.randn(shapes[s], generator=generator) for k, s in names},
             "gradients": {k: torch.randn(shapes[s], generator=generator) * 1e-3 for k, s in names}}
    return {"train": kinds}


def matrices(model: ModelConfig, sequences: int, component) -> list[tuple[int, int, int]]:  # noqa: ANN001
    """(m, n, ov product flops) of every matrix a component yields, per layer."""
    d, heads = model.d_model, model.attention_n_heads
    head_dim = d // heads
    if component.component_name == "simple":
        out = {"attention.v_proj": head_dim * model.attention_n_kv_heads, "attention.o_proj": d,
               "swiglu.w_2": d}[component.layer_suffixes]
        width = {"attention.v_proj": d, "attention.o_proj": d, "swiglu.w_2": model.activation_hidden_dim}
        shape = (sequences, out) if component.data_type == "activations" else (out, width[component.layer_suffixes])
        return [(*shape, 0)] * len(component.layers)
    head = {"activations": (sequences, d, 2 * sequences * head_dim * d), "weights": (head_dim, head_dim,
            2 * head_dim * d * head_dim), "gradients": (d, d, 4 * d * head_dim * d)}[component.data_type]
    return ([head] * heads + [(head[0], head[1] * heads, 0)]) * len(component.layers)


def svd_flops(m: int, n: int) -> float:
    k = min(m, n)
    return 4 * m * n * k + 22 * k ** 3


def spectral_seconds(flops: float, itemsize: int) -> float:
    """SVD / eigh / pinv flops on an A100 (module docstring's model)."""
    return flops / 2 / (A100_BYTES_S * 2 / itemsize) + flops / 2 / ((A100_FP32 if itemsize == 4 else A100_FP64) / 2)


def metric_flops(metric: MetricSpec, m: int, n: int) -> tuple[float, float]:
    """(GEMM-like, SVD-like) flops of one metric on one [m, n] matrix."""
    if metric.metric_name in ("per", "condition_number") or metric.norm_type == "nuclear":
        return 0.0, svd_flops(m, n)
    if metric.metric_name == "cka":
        return (4 * m * m * n if m < n else 6 * m * n * n), 0.0
    if metric.metric_name == "pwcca":
        return 2 * m * (2 * n) ** 2 + 4 * m * n * n, 60 * n ** 3
    return 0.0, 0.0


def flop_model(spec: AnalysisSpec, model: ModelConfig, sequences: int) -> dict[str, tuple[float, float, float]]:
    """Per `metric component data_type`: (product flops, SVD flops, A100 SVD seconds); per and condition_number of one
    component share its SVDs."""
    rows, spectra = {}, set()
    for metric in spec.metrics:
        for component in metric.components:
            gemm = svd = seconds = 0.0
            shared = (metric.data_split, component.component_name, component.data_type, str(component.layer_suffixes))
            again = metric.metric_name in ("per", "condition_number") and shared in spectra
            spectra |= {shared} if metric.metric_name in ("per", "condition_number") else set()
            for m, n, product in matrices(model, sequences, component):
                g, v = metric_flops(metric, m, n)
                if again:
                    v = 0.0
                gemm, svd = gemm + g + product * (2 if metric.comparative else 1), svd + v
                seconds += spectral_seconds(v, 8 if metric.metric_name == "pwcca" else 4)
            key = f"{metric.metric_name} {component.component_name} {component.data_type}"
            old = rows.get(key, (0.0, 0.0, 0.0))
            rows[key] = (old[0] + gemm, old[1] + svd, old[2] + seconds)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--presets", nargs="*", default=["tiny", "small"],
                        help="measured on this CPU (none: the model only)")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.sequences} train sequences")
    print("| preset | d_model | GEMM GFLOP | SVD GFLOP | CPU s | CPU GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        model = MODEL_PRESETS[preset]
        spec = spec_for(model)
        source, target = capture(model, args.sequences, generator), capture(model, args.sequences, generator)
        start = time.perf_counter()
        results = analyze(spec, 0, source, {1: target}, model)
        seconds = time.perf_counter() - start
        gemm, svd = (sum(row[i] for row in flop_model(spec, model, args.sequences).values()) for i in (0, 1))
        print(f"| {preset} | {model.d_model} | {gemm / 1e9:,.1f} | {svd / 1e9:,.1f} | {seconds:.2f} | "
              f"{(gemm + svd) / seconds / 1e9:.1f} |  ({sum(len(v) for v in results.values())} values)")
    large = MODEL_PRESETS["large"]
    rows = flop_model(spec_for(large), large, 1024)
    gemm, svd, svd_s = (sum(row[i] for row in rows.values()) for i in (0, 1, 2))
    print(f"\nlarge, 1024 train sequences: {gemm / 1e12:.2f} TFLOP of products + {svd / 1e12:.2f} TFLOP of SVDs")
    print(f"one A100: ~{gemm / A100_FP64 + svd_s:.0f} s per capture by the model (products at "
          f"{A100_FP64 / 1e12:.1f} TFLOP/s fp64, SVDs {svd_s:.0f} s); ~{gemm / A100_FP64 + svd / A100_SVD_BOUND:.0f} s "
          f"with every SVD at {A100_SVD_BOUND / 1e12:.1f} TFLOP/s")
    for key, (g, v, seconds) in sorted(rows.items(), key=lambda kv: -(kv[1][0] / A100_FP64 + kv[1][1]))[:6]:
        print(f"  {key}: {g / 1e12:.2f} + {v / 1e12:.2f} TFLOP, ~{g / A100_FP64 + seconds:.1f} s "
              f"(~{g / A100_FP64 + v / A100_SVD_BOUND:.1f} s at the bound)")


if __name__ == "__main__":
    main()
