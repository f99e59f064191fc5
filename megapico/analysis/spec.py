"""A pico-analyze metrics config (its own YAML) read into frozen dataclasses, and refused in one line where
pico-analyze would refuse it or crash on it.

The format (pico-analyze's src/config/): `analysis_name`; `metrics:`, a list of {metric_name, data_split,
components, plus target_checkpoint for the comparative cka and pwcca, norm_type for norm}; each component
{component_name: simple | ov_circuit, data_type: activations | weights | gradients, layer_suffixes: a suffix, or
{value_layer, output_layer} for ov_circuit, layers: [i, ...]}. `steps` and `monitoring` are accepted and not
used: megapico analyzes every capture. pico-analyze builds its config classes with `**yaml`, so a key a metric
does not declare (norm_type on gini, target_checkpoint on per) is a TypeError there: an error here too.

Two checks: load_analysis refuses what is wrong whatever the run (the file's shape, names, a metric on a data type
it does not support, a norm type); check_analysis refuses what is wrong for this run (a layer the model lacks,
pwcca on fewer sequences than neurons, a target step never captured). Both raise ConfigError naming the file and
the key, before any step trains.
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import yaml

from megapico.config import ConfigError, ModelConfig

DATA_TYPES = ("activations", "weights", "gradients")
METRIC_DATA_TYPES = {  # pico-analyze's validate_component of each metric
    "cka": ("activations",), "pwcca": ("activations",), "per": ("weights", "gradients"),
    "condition_number": DATA_TYPES, "gini": DATA_TYPES, "hoyer": DATA_TYPES, "norm": DATA_TYPES,
}
COMPARATIVE = ("cka", "pwcca")
NORM_TYPES = ("frobenius", "nuclear", "inf")
COMPONENTS = ("simple", "ov_circuit")
SPLITS = ("train", "val")  # the splits pico's learning dynamics capture
CAPTURED_SUFFIXES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")  # training/learning_dynamics.SUFFIXES
OV_SUFFIXES = {"value_layer": "attention.v_proj", "output_layer": "attention.o_proj"}
SEQUENCES_KNOB = {"val": "checkpointing.learning_dynamics.batch_size", "train": "the global batch"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # analysis_name is a directory under analysis_results/


@dataclass(frozen=True)
class ComponentSpec:
    component_name: str
    data_type: str
    layer_suffixes: str | Mapping[str, str]
    """simple: the captured suffix (e.g. swiglu.w_2); ov_circuit: {value_layer, output_layer}."""
    layers: tuple[int, ...]


@dataclass(frozen=True)
class MetricSpec:
    metric_name: str
    data_split: str
    components: tuple[ComponentSpec, ...]
    target_checkpoint: int | None = None
    """cka and pwcca: the step whose captured data every step is compared with."""
    norm_type: str | None = None
    """norm: frobenius | nuclear | inf."""

    @property
    def comparative(self) -> bool:
        return self.metric_name in COMPARATIVE

    @property
    def result_name(self) -> str:
        """pico-analyze's file stem and wandb prefix: `<metric>_<split>`."""
        return f"{self.metric_name}_{self.data_split}"


@dataclass(frozen=True)
class AnalysisSpec:
    analysis_name: str
    metrics: tuple[MetricSpec, ...]
    source: str = "analysis config"
    """The file it came from, for error messages."""


def _keys(found: Mapping, allowed: set[str], required: set[str], where: str, source: str) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise ConfigError(f"{source}: {where}: unknown key '{unknown[0]}' (pico-analyze accepts "
                          f"{', '.join(sorted(allowed))} here)")
    missing = sorted(required - set(found))
    if missing:
        raise ConfigError(f"{source}: {where}: '{missing[0]}' is required")


def _integer(value: object, where: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: {where}: {value!r} is not a step or layer number (an integer >= 0)")
    return value


def _component(raw: object, metric: str, where: str, source: str) -> ComponentSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where}: a component is a mapping (component_name, data_type, layer_suffixes, "
                          f"layers), not {type(raw).__name__}")
    _keys(raw, {"component_name", "data_type", "layer_suffixes", "layers"},
          {"component_name", "data_type", "layer_suffixes", "layers"}, where, source)
    name, data_type, suffixes = raw["component_name"], raw["data_type"], raw["layer_suffixes"]
    if name not in COMPONENTS:
        raise ConfigError(f"{source}: {where}.component_name: unknown component {name!r} (one of "
                          f"{', '.join(COMPONENTS)})")
    if data_type not in DATA_TYPES:
        raise ConfigError(f"{source}: {where}.data_type: {data_type!r} is not one of {', '.join(DATA_TYPES)}")
    if data_type not in METRIC_DATA_TYPES[metric]:
        raise ConfigError(f"{source}: {where}.data_type: {metric} does not support {data_type} (pico-analyze "
                          f"computes it on {' and '.join(METRIC_DATA_TYPES[metric])} only)")
    if name == "simple":
        if suffixes not in CAPTURED_SUFFIXES:
            raise ConfigError(f"{source}: {where}.layer_suffixes: {suffixes!r} is not a captured layer (one of "
                              f"{', '.join(CAPTURED_SUFFIXES)})")
    elif not isinstance(suffixes, Mapping) or dict(suffixes) != OV_SUFFIXES:
        raise ConfigError(f"{source}: {where}.layer_suffixes: ov_circuit needs {{value_layer: attention.v_proj, "
                          f"output_layer: attention.o_proj}}, not {suffixes!r}")
    layers = raw["layers"]
    if not isinstance(layers, list) or not layers:
        raise ConfigError(f"{source}: {where}.layers: a non-empty list of layer numbers, not {layers!r}")
    return ComponentSpec(name, data_type, suffixes if isinstance(suffixes, str) else MappingProxyType(dict(suffixes)),
                         tuple(_integer(layer, f"{where}.layers", source) for layer in layers))


def _metric(raw: object, where: str, source: str, seen: set[str]) -> MetricSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where}: a metric is a mapping (metric_name, data_split, components, ...), "
                          f"not {type(raw).__name__}")
    name = raw.get("metric_name")
    if name not in METRIC_DATA_TYPES:
        raise ConfigError(f"{source}: {where}.metric_name: unknown metric {name!r} (one of "
                          f"{', '.join(METRIC_DATA_TYPES)})")
    extra = {"target_checkpoint"} if name in COMPARATIVE else {"norm_type"} if name == "norm" else set()
    _keys(raw, {"metric_name", "data_split", "components"} | extra, {"data_split", "components"} | extra, where,
          source)
    if name in seen:  # pico-analyze keys its metrics by name: an earlier one would be silently dropped
        raise ConfigError(f"{source}: {where}.metric_name: {name} is listed twice; pico-analyze keeps only the last "
                          f"one (write another analysis config for the second)")
    seen.add(name)
    if raw["data_split"] not in SPLITS:
        raise ConfigError(f"{source}: {where}.data_split: {raw['data_split']!r} is not a captured split (train or val)")
    if name == "norm" and raw["norm_type"] not in NORM_TYPES:
        raise ConfigError(f"{source}: {where}.norm_type: {raw['norm_type']!r} is not one of {', '.join(NORM_TYPES)}")
    components = raw["components"]
    if not isinstance(components, list) or not components:
        raise ConfigError(f"{source}: {where}.components: a non-empty list of components, not {components!r}")
    target = raw.get("target_checkpoint")
    return MetricSpec(name, raw["data_split"],
                      tuple(_component(item, name, f"{where}.components[{index}]", source)
                            for index, item in enumerate(components)),
                      None if target is None else _integer(target, f"{where}.target_checkpoint", source),
                      raw.get("norm_type"))


def parse_analysis(raw: object, source: str) -> AnalysisSpec:
    """The parsed YAML of a pico-analyze metrics config -> AnalysisSpec (source names it in errors)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a pico-analyze metrics config is a mapping (analysis_name:, metrics:)")
    _keys(raw, {"analysis_name", "metrics", "steps", "monitoring"}, {"analysis_name", "metrics"}, "top level", source)
    name = raw["analysis_name"]
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{source}: analysis_name: {name!r} must name a directory (letters, digits, '.', '_', '-'); "
                          f"results go to analysis_results/<analysis_name>/")
    metrics = raw["metrics"]
    if not isinstance(metrics, list) or not metrics:
        raise ConfigError(f"{source}: metrics: a non-empty list of metrics, not {metrics!r}")
    seen: set[str] = set()
    return AnalysisSpec(name, tuple(_metric(item, f"metrics[{index}]", source, seen)
                                    for index, item in enumerate(metrics)), source)


def load_analysis(path: str | Path) -> AnalysisSpec:
    """Read a pico-analyze metrics YAML; anything pico-analyze would refuse whatever the run is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the analysis config ({err.strerror}); "
                          f"checkpointing.learning_dynamics.analysis names a pico-analyze metrics YAML") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_analysis(raw, str(path))


def neurons(model: ModelConfig, component: ComponentSpec) -> int:
    """The widest matrix pwcca sees for this component: its columns (neurons) per captured sequence. ov_circuit's
    full activation concatenates a d_model-wide product per head."""
    if component.component_name == "ov_circuit":
        return model.attention_n_heads * model.d_model
    if component.layer_suffixes == "attention.v_proj":
        return model.d_model // model.attention_n_heads * model.attention_n_kv_heads
    return model.d_model


def check_analysis(spec: AnalysisSpec, model: ModelConfig, capture_steps: Callable[[int], bool] | set[int],
                   val_sequences: int, train_sequences: int) -> None:
    """Refuse, in one line naming the file and key, what pico-analyze would refuse on this run: a layer the model
    lacks, pwcca on a split with no more sequences than the component has neurons (its CCA asserts neurons <
    datapoints), a target step the run never captures. `capture_steps`: the steps the run captures (a set, or a
    predicate); `val_sequences` / `train_sequences`: the sequences each split's capture holds."""
    captured = capture_steps.__contains__ if isinstance(capture_steps, (set, frozenset)) else capture_steps
    sequences = {"val": val_sequences, "train": train_sequences}
    for index, metric in enumerate(spec.metrics):
        where = f"metrics[{index}]"
        for number, component in enumerate(metric.components):
            bad = [layer for layer in component.layers if layer >= model.n_layers]
            if bad:
                raise ConfigError(f"{spec.source}: {where}.components[{number}].layers: the model has no layer "
                                  f"{bad[0]} (model.n_layers = {model.n_layers}: layers 0..{model.n_layers - 1})")
            width = neurons(model, component)
            if metric.metric_name == "pwcca" and sequences[metric.data_split] <= width:
                knob = SEQUENCES_KNOB[metric.data_split]
                raise ConfigError(
                    f"{spec.source}: {where}: pwcca on {component.component_name} {metric.data_split} activations "
                    f"needs more than {width} sequences (its neurons), the {metric.data_split} capture holds "
                    f"{sequences[metric.data_split]}; raise {knob} or use cka")
        if metric.comparative and not captured(metric.target_checkpoint):
            raise ConfigError(f"{spec.source}: {where}.target_checkpoint: the run never captures step "
                              f"{metric.target_checkpoint} (captures are at step 0, the learning-dynamics interval "
                              f"and every checkpoint up to training.max_steps)")
