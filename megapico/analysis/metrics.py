"""pico-analyze's metrics on one capture's tensors: the numbers its scripts/analyze.py writes for that step.

Definitions (pico-analyze's src/metrics/, src/components/ and lib/, commit c4a4e844), computed here in fp64 from
the fp32 captures (pico-analyze runs cka in fp32 numpy, pwcca in fp64 numpy, the rest in the tensors' fp32; the
difference is their rounding, held to 1e-4 by tests/test_analysis_metrics.py):

Components, per listed layer i, keyed `{prefix}{i}.{...}` where prefix is what precedes the layer number in the
captured keys (`layers.`):
- simple: the captured tensor of `layer_suffixes`, keyed `{prefix}{i}.{suffix}.{data_type}`.
- ov_circuit, per head h (kv head h // (heads / kv_heads), head_dim = d_model / heads), keyed
  `{prefix}{i}.ov_circuit.{data_type}.heads.{h}`, then all heads concatenated on dim 1, keyed
  `{prefix}{i}.ov_circuit.{data_type}`:
  activations: v_proj's rows of head h's kv slice @ o_proj[:, head h's columns].T -> [sequences, d_model];
  weights: v_proj[kv rows, :] @ o_proj[:, head columns] -> [head_dim, head_dim];
  gradients: o_proj[:, head cols] @ dv_proj[kv rows, :] + do_proj[:, head cols] @ v_proj[kv rows, :] -> [d_model,
  d_model] (pico-analyze's chain rule, as written there).
Metrics, on each component matrix X:
- cka: linear CKA in feature space of the column-centred X and target Y, ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)
  (Kornblith et al. 2019), computed through the n x n Gram matrices when there are fewer sequences than features.
- pwcca: projection-weighted CCA (Morcos et al. 2018, Google's svcca code as pico-analyze vendors it): covariance
  of [X^T; Y^T] (ddof 1), blocks scaled by their largest |entry|, inverse square roots through pinv (cut-off
  1e-15 x largest singular value) and eigh, canonical correlations s = svd(Sxx^-1/2 Sxy Syy^-1/2); weights from
  the QR of the directions u^T (X^T - mean) + mean, |Q^T X| summed per direction, normalised; pwcca = sum(w s).
  pico-analyze passes epsilon=1e-6 to robust_cca_similarity, which does not forward it: epsilon is 0 as here.
- per: exp(entropy of the singular values normalised to sum 1) / their count.
- condition_number: largest / smallest singular value.
- gini: sum((2i - n - 1) |x|_(i)) / (n sum |x|) over the sorted |entries| (0 when all are 0).
- hoyer: (sqrt(n) - ||x||_1 / ||x||_2) / (sqrt(n) - 1) over all n entries.
- norm: frobenius (entries' 2-norm), nuclear (sum of singular values), inf (largest |entry|: torch.norm with
  p=inf on a matrix is the vector norm of its entries).
"""

import math
import re
from collections.abc import Iterator, Mapping

import torch

from megapico.analysis.spec import AnalysisSpec, ComponentSpec, MetricSpec
from megapico.config import ModelConfig

Tensors = Mapping[str, torch.Tensor]
Dynamics = Mapping[str, Mapping[str, Tensors]]  # split -> kind (activations | weights | gradients) -> key -> tensor
LAYER_KEY = re.compile(r"(.*?layers\.)\d+\.")
CCA_TRIALS = 10  # svcca's num_cca_trials
PINV_RTOL = 1e-15  # numpy.linalg.pinv's default cut-off, which pico-analyze's CCA uses
CPU = torch.device("cpu")


def model_prefix(states: Mapping[str, Tensors]) -> str:
    """pico-analyze's model prefix (the common prefix of its captured keys): what precedes the layer number,
    `layers.` for megapico's and pico-train's keys. Read off one key, so a capture kept for a later target (some
    suffixes only) gives the same."""
    for tensors in states.values():
        for key in tensors:
            match = LAYER_KEY.match(key)
            if match:
                return match.group(1)
    raise ValueError("no captured tensors keyed {prefix}layers.{i}.{suffix} to analyze")


def _tensor(states: Mapping[str, Tensors], kind: str, key: str, device: torch.device) -> torch.Tensor:
    try:
        return states[kind][key].to(device).float()
    except KeyError:
        raise ValueError(f"the capture holds no {kind} '{key}' that the analysis needs") from None


def component_matrices(states: Mapping[str, Tensors], component: ComponentSpec, model: ModelConfig,
                       device: torch.device = CPU) -> Iterator[tuple[str, torch.Tensor]]:
    """pico-analyze's component: (result key, fp32 matrix on `device`) in its order (per layer: heads, then the
    whole), one layer's matrices built at a time (a GPU worker holds one layer, not the model's)."""
    prefix, kind = model_prefix(states), component.data_type
    if component.component_name == "simple":
        for layer in component.layers:
            name = f"{prefix}{layer}.{component.layer_suffixes}"
            yield f"{name}.{kind}", _tensor(states, kind, name, device)
        return
    heads, head_dim = model.attention_n_heads, model.d_model // model.attention_n_heads
    group = heads // model.attention_n_kv_heads
    value, output = component.layer_suffixes["value_layer"], component.layer_suffixes["output_layer"]
    for layer in component.layers:
        o_proj = _tensor(states, "weights", f"{prefix}{layer}.{output}", device)
        if kind == "activations":
            v_rows = _tensor(states, "activations", f"{prefix}{layer}.{value}", device)
        else:
            v_proj = _tensor(states, "weights", f"{prefix}{layer}.{value}", device)
        if kind == "gradients":
            d_o = _tensor(states, "gradients", f"{prefix}{layer}.{output}", device)
            d_v = _tensor(states, "gradients", f"{prefix}{layer}.{value}", device)
        per_head = []
        for head in range(heads):
            kv = slice(head // group * head_dim, (head // group + 1) * head_dim)
            cols = slice(head * head_dim, (head + 1) * head_dim)
            if kind == "activations":
                matrix = v_rows[:, kv] @ o_proj[:, cols].T
            elif kind == "weights":
                matrix = v_proj[kv, :] @ o_proj[:, cols]
            else:
                matrix = o_proj[:, cols] @ d_v[kv, :] + d_o[:, cols] @ v_proj[kv, :]
            yield f"{prefix}{layer}.ov_circuit.{kind}.heads.{head}", matrix
            per_head.append(matrix)
        yield f"{prefix}{layer}.ov_circuit.{kind}", torch.cat(per_head, dim=1)


def cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [samples, features] matrices (feature-space form; Gram form when samples < features)."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    if x.shape[0] < max(x.shape[1], y.shape[1]):  # ||X^T Y||_F^2 = <X X^T, Y Y^T>_F, ||X^T X||_F = ||X X^T||_F
        gram_x, gram_y = x @ x.T, y @ y.T
        return float((gram_x * gram_y).sum() / (torch.linalg.norm(gram_x) * torch.linalg.norm(gram_y)))
    return float(torch.linalg.norm(x.T @ y) ** 2 / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)))


def _inverse_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """svcca's positivedef_matrix_sqrt(pinv(sigma)): a negative eigenvalue of the pseudo-inverse (sigma singular)
    gives NaN, as there."""
    values, vectors = torch.linalg.eigh(torch.linalg.pinv(sigma, rtol=PINV_RTOL))
    return vectors @ torch.diag(values.sqrt()) @ vectors.T


def _cca(acts1: torch.Tensor, acts2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """svcca's get_cca_similarity on [neurons, samples] matrices: (u, canonical correlations, acts1's means)."""
    numx = acts1.shape[0]
    covariance = torch.cov(torch.cat([acts1, acts2]))
    sxx, sxy, syy = covariance[:numx, :numx], covariance[:numx, numx:], covariance[numx:, numx:]
    xmax, ymax = sxx.abs().max(), syy.abs().max()
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / torch.sqrt(xmax * ymax)
    u, s, _ = torch.linalg.svd(_inverse_sqrt(sxx) @ sxy @ _inverse_sqrt(syy))  # raises on NaN, as numpy's does
    return u, s.abs(), acts1.mean(1, keepdim=True)


def _noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1e-6) drawn on the CPU (the same numbers on any device), on `like`'s device."""
    return (torch.randn(like.shape, generator=generator, dtype=torch.float64) * 1e-6).to(like.device)


def pwcca(x: torch.Tensor, y: torch.Tensor) -> float:
    """Projection-weighted CCA of two [samples, neurons] matrices (needs samples > neurons). Where the CCA fails
    (a singular covariance: ov_circuit's activations have rank <= head_dim per head), svcca's
    robust_cca_similarity retries on acts * 0.1 + N(0, 1e-6) noise, up to 10 tries; so does this, with a seeded
    generator (pico-analyze's noise is unseeded: its value there changes from run to run). NaN if all fail."""
    acts1, acts2 = x.double().T, y.double().T  # [neurons, samples], svcca's layout
    tried1, tried2 = acts1, acts2
    generator = torch.Generator().manual_seed(0)
    for _ in range(CCA_TRIALS):
        try:
            u, s, means = _cca(tried1, tried2)
            break
        except torch.linalg.LinAlgError:
            tried1 = tried1 * 0.1 + _noise(tried1, generator)
            tried2 = tried2 * 0.1 + _noise(tried1, generator)
    else:
        return math.nan
    directions = u.T @ (acts1 - means) + means  # svcca weighs with the inputs as given, the retry's means
    q, _ = torch.linalg.qr(directions.T)
    weights = (q.T @ acts1.T).abs().sum(1)
    return float((weights / weights.sum() * s).sum())


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """As pico-analyze takes them (torch.svd(x).S: the driver that also computes the vectors, in x's fp32), so an
    ill-conditioned matrix's smallest ones, at fp32's noise floor, come out the same here as there."""
    return torch.linalg.svd(x, full_matrices=False).S


def per(singular: torch.Tensor) -> float:
    """From singular_values(x)."""
    p = singular / singular.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()) / len(singular))


def condition_number(singular: torch.Tensor) -> float:
    """From singular_values(x)."""
    return float(singular.max() / singular.min())


def gini(x: torch.Tensor) -> float:
    values = torch.sort(x.flatten().abs()).values
    n, total = values.numel(), values.sum()
    if n == 0 or total == 0:
        return 0.0
    index = torch.arange(1, n + 1, dtype=values.dtype, device=values.device)
    return float(((2 * index - n - 1) * values).sum() / (n * total))


def hoyer(x: torch.Tensor) -> float:
    n = x.numel()
    ratio = float(torch.linalg.vector_norm(x, 1) / torch.linalg.vector_norm(x, 2))
    return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)


NORMS = {"frobenius": lambda x: float(torch.linalg.vector_norm(x, 2)),
         "nuclear": lambda x: float(torch.linalg.matrix_norm(x, "nuc")),
         "inf": lambda x: float(x.abs().max())}
SPECTRAL = {"per": per, "condition_number": condition_number}  # of singular_values(x): one SVD per matrix serves both
SINGLE = {"gini": gini, "hoyer": hoyer}
PAIRED = {"cka": cka, "pwcca": pwcca}
Spectra = dict[tuple[str, str, str], torch.Tensor]


def metric_values(metric: MetricSpec, states: Mapping[str, Tensors], model: ModelConfig,
                  target_states: Mapping[str, Tensors] | None = None, spectra: Spectra | None = None,
                  device: torch.device = CPU) -> dict[str, float]:
    """One metric on one split's capture: pico-analyze's JSON for that step (component results merged in order).
    `spectra`: singular values already taken of this split's matrices (per and condition_number of one matrix
    share its SVD, the analysis's largest cost), filled here."""
    values: dict[str, float] = {}
    spectra = {} if spectra is None else spectra
    for component in metric.components:
        source = component_matrices(states, component, model, device)
        if metric.comparative:
            target = component_matrices(target_states, component, model, device)
            for (key, matrix), (_, other) in zip(source, target, strict=True):
                values[key] = PAIRED[metric.metric_name](matrix, other)
        elif metric.metric_name in SPECTRAL:
            for key, matrix in source:
                known = (metric.data_split, repr(component.layer_suffixes), key)
                if known not in spectra:
                    spectra[known] = singular_values(matrix)
                values[key] = SPECTRAL[metric.metric_name](spectra[known])
        else:
            compute = NORMS[metric.norm_type] if metric.metric_name == "norm" else SINGLE[metric.metric_name]
            values.update({key: compute(matrix) for key, matrix in source})
    return values


def analyze(spec: AnalysisSpec, step: int, dynamics: Dynamics, targets: Mapping[int, Dynamics] | None,
            model: ModelConfig, comparative: bool | None = None, device: torch.device = CPU
            ) -> dict[str, dict[str, float]]:
    """pico-analyze's results for capture `step`: `<metric>_<split>` -> the JSON content it writes in
    step_{step}/. `dynamics[split][kind][key]`: the step's captured tensors. `targets`: target step -> its capture
    (the same layout; at least needed_for_targets(spec)); a comparative metric whose target is not there yet is left
    out, to be computed when the target is captured. `comparative`: None = every metric, True = only cka/pwcca,
    False = only the others (a step whose single-checkpoint results are already written). `device`: where the
    matrices are built and measured (each moved there as read; the CPU path is pico-analyze's own)."""
    results, spectra = {}, {}
    with torch.no_grad():
        for metric in spec.metrics:
            if comparative is not None and metric.comparative != comparative:
                continue
            target_states = None
            if metric.comparative:
                if not targets or metric.target_checkpoint not in targets:
                    continue
                target_states = targets[metric.target_checkpoint][metric.data_split]
            results[metric.result_name] = metric_values(metric, dynamics[metric.data_split], model, target_states,
                                                        spectra, device)
    return results


def needed_for_targets(spec: AnalysisSpec) -> set[tuple[str, str, str]]:
    """(split, kind, suffix) that the comparative metrics read from a capture: what an earlier step must keep until
    its target is captured (and the target step for the steps after it), instead of the whole capture."""
    needed = set()
    for metric in spec.metrics:
        if not metric.comparative:
            continue
        for component in metric.components:
            if component.component_name == "simple":
                needed.add((metric.data_split, component.data_type, component.layer_suffixes))
            else:  # ov_circuit activations: v_proj's rows and o_proj's weight
                needed.add((metric.data_split, "activations", component.layer_suffixes["value_layer"]))
                needed.add((metric.data_split, "weights", component.layer_suffixes["output_layer"]))
    return needed
