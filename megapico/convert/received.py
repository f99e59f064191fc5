"""A received run's data files, checked and rewritten: nothing of a sender's passes through megapico's exports as-is.

A run directory may come from someone else, and what megapico writes from it (an HF export, pico's run directory,
a published repo) is loaded by other people's tools: transformers follows a config.json's `auto_map` to code on the
Hub, and pico-analyze's torch.load may unpickle anything. So every file that leaves is either generated here from
checked values, or read with the library that owns its format and written anew:

- tokenizer.json: parsed and re-serialised by `tokenizers` (only what it understands survives; a file it cannot
  read, or one over TOKENIZER_MAX_BYTES, is refused);
- model.safetensors: read with safetensors (never a pickle), exactly pico's keys, shapes and fp32;
- config.json: only pico's model keys are read, types checked; everything else (`auto_map` included) is ignored;
- learning_dynamics/: each file read through the checkpoint reader, checked to be pico's keys, shapes and fp32
  tensors, saved again; `train_data/` loaded only when its state.json names plain files inside it, then saved again;
- eval_results/step_N.json: parsed, checked to be {name: number}, dumped again;
- analysis_results/<analysis_name>/step_N/<metric>_<split>.json (pico-analyze's results, which training writes):
  each opened without following a link, parsed, checked to be {component key: number or null}, dumped again.

Paths a received config names are followed only inside its run directory (export_tokenizer): a config saying
`data.tokenizer: /home/you/secret.json` must not make an export ship that file.
"""

import json
import math
import os
import re
import stat
from pathlib import Path

import torch

from megapico.analysis.spec import METRIC_DATA_TYPES, NAME, SPLITS
from megapico.checkpoint.files import read_checkpoint_file
from megapico.checkpoint.paths import CheckpointError, inside, refuse_links, replacing, write_text
from megapico.checkpoint.training_state import step_of
from megapico.config import ConfigError, MegapicoConfig, ModelConfig, validate_model
from megapico.model import PicoDecoder
from megapico.training.learning_dynamics import SUFFIXES

TOKENIZER_MAX_BYTES = 64 * 2**20  # pico's tokenizer.json is 2 MiB; the largest common ones (Gemma's) about 34 MiB
JSON_MAX_BYTES = 2**20  # config.json, eval results, a dataset's state.json: a few hundred bytes each
RUN_TOKENIZER = "tokenizer.json"  # runs/RUN/tokenizer.json: training's copy of data.tokenizer, written at start
DYNAMICS_FILES = tuple(f"{split}_{kind}.pt" for split in ("train", "val")
                       for kind in ("activations", "weights", "gradients"))
TRAIN_DATA = "train_data"
TRAIN_DATA_COLUMNS = ("input_ids", "text")  # what pico-train and megapico save (text only with a tokenizer)
HF_INT_FIELDS = ("d_model", "n_layers", "attention_n_heads", "attention_n_kv_heads", "activation_hidden_dim",
                 "vocab_size", "max_seq_len", "batch_size")
HF_FLOAT_FIELDS = ("norm_eps", "position_emb_theta")
MAX_DIMENSION = 2**31  # any size or count of a pico config.json; larger ones describe no model that was trained
PREFIX = re.compile(r"([A-Za-z_][A-Za-z0-9_]*\.)*")  # pico-train's keys carry its wrapper's module path
RESULT_NAME = re.compile(rf"({'|'.join(METRIC_DATA_TYPES)})_({'|'.join(SPLITS)})\.json")  # pico-analyze's file names
COMPONENT_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,255}")  # {prefix}{layer}.{suffix}.{data_type}[.heads.{h}]


def read_capped(path: Path, cap: int) -> bytes:
    """The bytes of a file no larger than `cap` (never more is read); a one-line CheckpointError otherwise."""
    try:
        with open(path, "rb") as file:
            data = file.read(cap + 1)
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err.strerror})") from None
    if len(data) > cap:
        raise CheckpointError(f"{path}: larger than the {cap:,} bytes a file of its kind holds; refusing to read it")
    return data


def parse_json(path: Path, data: bytes) -> object:
    """The JSON value of `data` (read from `path`), or a one-line CheckpointError: also for deep nesting and for an
    integer of more digits than Python converts."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: not JSON ({(str(err).splitlines() or [type(err).__name__])[0][:120]})"
                              ) from None


def read_json(path: Path, cap: int = JSON_MAX_BYTES) -> object:
    """A small JSON file's value, or a one-line CheckpointError."""
    return parse_json(path, read_capped(path, cap))


# tokenizers
def tokenizer_json(tokenizer_path: str | Path) -> Path:
    """The tokenizer.json a path names (the file, or the one in an HF directory), or a one-line CheckpointError."""
    source = Path(tokenizer_path)
    file = source / "tokenizer.json" if source.is_dir() else source
    if not file.is_file():
        raise CheckpointError(f"{tokenizer_path}: tokenizer not found (pass --tokenizer PATH to tokenizer.json)")
    return file


def clean_tokenizer_json(path: Path) -> str:
    """The tokenizer.json text as `tokenizers` re-serialises it: only what that library understands passes (it
    refuses unknown keys such as an `auto_map`), so the text can name no code. One line if it is not one."""
    from tokenizers import Tokenizer

    data = read_capped(Path(path), TOKENIZER_MAX_BYTES)
    try:
        return Tokenizer.from_str(data.decode("utf-8")).to_str()
    except Exception as err:  # a received config may name any file: say what it is not, show none of it
        raise CheckpointError(f"{path}: not a tokenizers JSON file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120] if str(err) else 'unreadable'}); pass --tokenizer "
                              f"PATH to the model's tokenizer.json") from None


def save_run_tokenizer(run_dir: Path, tokenizer_path: str | Path) -> None:
    """Keep a run's own tokenizer copy (runs/RUN/tokenizer.json, what its exports ship), re-serialised, for runs
    made by an import rather than by training (which writes it at start). A sentencepiece model has none."""
    if str(tokenizer_path).endswith(".model"):
        return
    write_text(run_dir / RUN_TOKENIZER, clean_tokenizer_json(tokenizer_json(tokenizer_path)))


def _within(root: Path, path: Path) -> bool:
    resolved, base = path.resolve(), root.resolve()
    return resolved == base or base in resolved.parents


def export_tokenizer(checkpoint_dir: Path, config: MegapicoConfig, tokenizer: str | Path | None = None) -> Path:
    """The tokenizer an export of a checkpoint ships: the one the user named (trusted as given); else the run
    directory's own copy (runs/RUN/tokenizer.json, where RUN is checkpoint_dir/../..); else the config's
    data.tokenizer only if it lies inside that run directory. Anything else is one line asking for --tokenizer."""
    if tokenizer:
        return tokenizer_json(tokenizer)
    run_dir = checkpoint_dir.parent.parent
    own = run_dir / RUN_TOKENIZER
    if own.is_file() or own.is_symlink():
        return inside(run_dir, own)
    named = config.data.tokenizer
    if named and _within(run_dir, Path(named)):
        return tokenizer_json(named)
    where = (f"and its config's data.tokenizer ({named[:120]}) lies outside the run, which a checkpoint's config "
             f"may not point to" if named else "and its config names no data.tokenizer")
    raise CheckpointError(f"{checkpoint_dir}: the run keeps no tokenizer of its own ({own} is missing) {where}; "
                          f"pass --tokenizer PATH")


# the model
def pico_hf_fields(config_json: Path) -> dict[str, int | float]:
    """pico's model keys of an HF config.json (and batch_size), types checked; every other key (`auto_map`,
    `architectures`, anything a sender added) is ignored and never passed on."""
    config = read_json(config_json)
    if not isinstance(config, dict) or config.get("model_type") != "pico_decoder":
        raise CheckpointError(f"{config_json}: not a pico config.json (its model_type is not 'pico_decoder')")
    fields = {}
    for name in (*HF_INT_FIELDS, *HF_FLOAT_FIELDS):
        value = config.get(name)
        if name in HF_INT_FIELDS:
            fits = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_DIMENSION
        else:
            fits = isinstance(value, int | float) and not isinstance(value, bool) and (
                math.isfinite(value) if isinstance(value, float) else abs(value) <= MAX_DIMENSION)
        if not fits:
            raise CheckpointError(f"{config_json}: '{name}' is {str(value)[:40]!r}, not "
                                  f"{'a positive integer' if name in HF_INT_FIELDS else 'a number'}; not a pico "
                                  f"config.json")
        fields[name] = value if name in HF_INT_FIELDS else float(value)
    return fields


def pico_model_config(config_json: Path) -> ModelConfig:
    """The ModelConfig of a pico HF config.json, read as data (pico_hf_fields), checked as megapico checks its own."""
    fields = pico_hf_fields(config_json)
    model = ModelConfig(**{name: value for name, value in fields.items() if name != "batch_size"})
    try:
        validate_model(model)
    except ConfigError as err:
        raise CheckpointError(f"{config_json}: {err}") from None
    return model


def model_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """PicoDecoder's state-dict keys and shapes (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        decoder = PicoDecoder(model)
    return {key: tuple(value.shape) for key, value in decoder.state_dict().items()}


def checked_model_tensors(path: Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """A pico HF model.safetensors, read with safetensors: keys exactly `pico_decoder.` + PicoDecoder's, each fp32
    (what pico-train and megapico write) of the model's shape, checked from the header before any tensor is read.
    Returns the file's keys and tensors."""
    from safetensors import safe_open

    expected = {f"pico_decoder.{key}": shape for key, shape in model_shapes(model).items()}
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = set(file.keys())
            if odd := sorted(keys ^ set(expected)):
                raise CheckpointError(f"{path}: {'holds the unexpected' if odd[0] in keys else 'lacks the'} tensor "
                                      f"'{odd[0][:80]}'; not the weights of this pico model")
            for key, shape in expected.items():
                view = file.get_slice(key)
                if view.get_dtype() != "F32" or tuple(view.get_shape()) != shape:
                    raise CheckpointError(f"{path}: '{key}' is {view.get_dtype()} {list(view.get_shape())[:8]}, "
                                          f"the model needs F32 {list(shape)}; not the weights of this pico model")
            return {key: file.get_tensor(key) for key in expected}
    except CheckpointError:
        raise
    except Exception as err:  # not a safetensors file, truncated, or a header whose offsets do not add up
        raise CheckpointError(f"{path}: unreadable as safetensors ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None


# learning dynamics
def checked_dynamics(path: Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """One learning-dynamics file, read through the checkpoint reader: a dict whose keys are exactly one prefix +
    `layers.{i}.{suffix}` for every layer and SUFFIXES, each an fp32 tensor (weights and gradients of the weight's
    shape; activations [sequences, out_features], the same sequences in every key). Returns copies that own their
    storage (a view saved as it came would carry whatever storage it points into)."""
    shapes = model_shapes(model)
    names = [f"layers.{i}.{suffix}" for i in range(model.n_layers) for suffix in SUFFIXES]
    data = read_checkpoint_file(path)
    kind = path.stem.split("_", 1)[-1]

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why}; not pico's learning dynamics for this model, refusing it")

    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise refuse(f"holds a {type(data).__name__}, not a dict of named tensors")
    first = next((key for key in data if key.endswith(names[0])), "")
    prefix = first[:len(first) - len(names[0])]
    if not first or not PREFIX.fullmatch(prefix) or set(data) != {prefix + name for name in names}:
        odd = sorted(set(data) ^ {prefix + name for name in names})
        raise refuse(f"its keys are not {prefix}layers.{{i}}.{{{','.join(SUFFIXES)}}} for {model.n_layers} layers "
                     f"({'no ' + names[0] if not first else repr((odd or [first])[0][:80])})")
    rows = set()
    for name in names:
        value = data[prefix + name]
        weight = shapes[f"{name}.weight"]
        if type(value) is not torch.Tensor or value.dtype != torch.float32 or value.layout != torch.strided:
            raise refuse(f"'{prefix + name}' is {getattr(value, 'dtype', type(value).__name__)}, not an fp32 tensor")
        needed = f"[sequences, {weight[0]}]" if kind == "activations" else str(list(weight))
        if kind == "activations" and value.dim() == 2 and value.shape[0] >= 1 and value.shape[1] == weight[0]:
            rows.add(value.shape[0])
        elif kind == "activations" or tuple(value.shape) != weight:
            raise refuse(f"'{prefix + name}' has shape {list(value.shape)[:8]}, the model needs {needed}")
    if len(rows) > 1:
        raise refuse(f"its activations hold different numbers of sequences ({sorted(rows)})")
    return {key: value.clone(memory_format=torch.contiguous_format) for key, value in data.items()}


def write_checked_train_data(source: Path, target: Path, vocab_size: int) -> None:
    """pico's `train_data/` (an HF dataset saved with save_to_disk): its state.json may name only plain files inside
    the folder, its columns are input_ids (token ids below vocab_size) and optionally text; saved anew."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    refuse_links(source)
    state = read_json(source / "state.json")
    listed = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(listed, list) or not listed:
        raise CheckpointError(f"{source / 'state.json'}: lists no data files; not a saved HF dataset")
    for entry in listed:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name \
                or not (source / name).is_file():
            raise CheckpointError(f"{source / 'state.json'}: names data file {str(name)[:80]!r}, not a plain file "
                                  f"inside {source}; refusing it")
    try:
        table = datasets.load_from_disk(str(source)).data.table
    except Exception as err:
        raise CheckpointError(f"{source}: not a readable saved HF dataset ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None
    columns = table.column_names
    if "input_ids" not in columns or not set(columns) <= set(TRAIN_DATA_COLUMNS):
        raise CheckpointError(f"{source}: columns {columns[:8]}, pico's train_data has input_ids (and text); "
                              f"refusing it")
    ids = table.column("input_ids")
    if not (pa.types.is_list(ids.type) or pa.types.is_large_list(ids.type)) or \
            not pa.types.is_integer(ids.type.value_type):
        raise CheckpointError(f"{source}: input_ids are {ids.type}, not lists of token ids; refusing it")
    if "text" in columns and not pa.types.is_string(table.column("text").type):
        raise CheckpointError(f"{source}: text is {table.column('text').type}, not strings; refusing it")
    bounds = pc.min_max(pc.list_flatten(ids))
    if bounds["min"].as_py() is not None and (bounds["min"].as_py() < 0 or bounds["max"].as_py() >= vocab_size):
        raise CheckpointError(f"{source}: token ids run from {bounds['min'].as_py()} to {bounds['max'].as_py()}, "
                              f"outside the model's vocabulary of {vocab_size}; refusing it")
    datasets.Dataset.from_dict({name: table.column(name).to_pylist() for name in TRAIN_DATA_COLUMNS
                                if name in columns}).save_to_disk(str(target))


def write_checked_learning_dynamics(source: Path, target: Path, model: ModelConfig) -> None:
    """pico's learning_dynamics/ folder, checked and written anew into `target` (created): each
    {train,val}_{activations,weights,gradients}.pt through checked_dynamics, `train_data/` through
    write_checked_train_data. Any other file in it is not copied."""
    refuse_links(source)
    target.mkdir(parents=True)
    for name in DYNAMICS_FILES:
        if (source / name).is_file():
            tensors = checked_dynamics(source / name, model)
            with replacing(target / name) as tmp:
                torch.save(tensors, tmp)
    if (source / TRAIN_DATA).is_dir():
        write_checked_train_data(source / TRAIN_DATA, target / TRAIN_DATA, model.vocab_size)


# evaluation results
def eval_result_values(result: object, path: Path) -> dict[str, float]:
    """The content of an eval_results/step_N.json (read from `path`): {eval set name: perplexity}, checked."""
    if not isinstance(result, dict) or not all(isinstance(key, str) and isinstance(value, int | float)
                                               and not isinstance(value, bool) for key, value in result.items()):
        raise CheckpointError(f"{path}: not {{eval set name: perplexity}}; refusing it")
    try:
        return {key: float(value) for key, value in result.items()}
    except OverflowError:
        raise CheckpointError(f"{path}: holds an integer beyond any float; refusing it") from None


def checked_eval_result(path: Path) -> dict[str, float]:
    """eval_results/step_N.json: {eval set name: perplexity}, read as data and checked."""
    return eval_result_values(read_json(path), path)


def write_checked_eval_results(source: Path, target: Path) -> None:
    """Every eval_results/step_N.json, checked and dumped again into `target` (created); other files are not
    copied."""
    refuse_links(source)
    target.mkdir(parents=True)
    for path in sorted(source.glob("step_*.json")):
        if step_of(path.stem) >= 0 and path.is_file():
            write_text(target / path.name, json.dumps(checked_eval_result(path)))


# analysis results
def analysis_steps(source: Path) -> dict[int, list[Path]]:
    """analysis_results/'s step directories, <analysis_name>/step_N with names of the forms pico-analyze and training
    write (a step number without leading zeros), by step: step -> its directories (one per analysis). Any other
    entry is ignored and never copied."""
    steps: dict[int, list[Path]] = {}
    for analysis in sorted(source.iterdir()) if source.is_dir() else []:
        if not (NAME.fullmatch(analysis.name) and analysis.is_dir()):
            continue
        for directory in sorted(analysis.iterdir()):
            step = step_of(directory.name)
            if step >= 0 and directory.name == f"step_{step}" and directory.is_dir():
                steps.setdefault(step, []).append(directory)
    return dict(sorted(steps.items()))


def analysis_files(step_dir: Path) -> list[Path]:
    """A step directory's <metric>_<split>.json files (pico-analyze's metrics and splits); nothing else is read."""
    return sorted(path for path in step_dir.iterdir() if RESULT_NAME.fullmatch(path.name) and path.is_file())


def _read_plain(path: Path, cap: int) -> bytes:
    """The bytes of a regular file no larger than `cap`, opened without following a link at its name (one swapped in
    after a refuse_links walk is not read)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be opened as a plain file ({err.strerror}); refusing it") from None
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise CheckpointError(f"{path}: not a regular file; refusing it")
        data = file.read(cap + 1)
    if len(data) > cap:
        raise CheckpointError(f"{path}: larger than the {cap:,} bytes a file of its kind holds; refusing to read it")
    return data


def checked_analysis_result(path: Path) -> dict[str, float | None]:
    """One <metric>_<split>.json as pico-analyze writes it: {component key: value}, each value a number (NaN and
    infinities as Python's json writes them) or null, read as data and checked."""
    result = parse_json(path, _read_plain(path, JSON_MAX_BYTES))
    if not isinstance(result, dict):
        raise CheckpointError(f"{path}: holds a {type(result).__name__}, not pico-analyze's {{component key: "
                              f"number}}; refusing it")
    values: dict[str, float | None] = {}
    for key, value in result.items():
        if not COMPONENT_KEY.fullmatch(key):
            raise CheckpointError(f"{path}: key {key[:80]!r} is not a component key (letters, digits, '_', '.'); "
                                  f"refusing it")
        if not (value is None or isinstance(value, int | float) and not isinstance(value, bool)):
            raise CheckpointError(f"{path}: {key!r} is a {type(value).__name__}, not a number; refusing it")
        try:
            values[key] = None if value is None else float(value)
        except OverflowError:
            raise CheckpointError(f"{path}: {key!r} is an integer beyond any float; refusing it") from None
    return values


def write_checked_analysis_step(step_dir: Path, target: Path) -> list[str]:
    """One analysis step directory's result files, checked and dumped again into `target` (created); returns the file
    names written."""
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for path in analysis_files(step_dir):
        write_text(target / path.name, json.dumps(checked_analysis_result(path)))
        names.append(path.name)
    return names


def write_checked_analysis_results(source: Path, target: Path) -> None:
    """analysis_results/ (every <analysis_name>/step_N/<metric>_<split>.json), checked and dumped again into `target`
    (created); a link anywhere in it is refused, any other file is not copied."""
    refuse_links(source)
    target.mkdir(parents=True)
    for directories in analysis_steps(source).values():
        for step_dir in directories:
            write_checked_analysis_step(step_dir, target / step_dir.parent.name / step_dir.name)
