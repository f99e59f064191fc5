"""Names and paths that come from files, and writes into run directories that may have come from someone else.

A received run directory is data written by another person: its config.yaml names the run, `latest` names a
checkpoint, manifest.json names files. None of them may steer a read, a copy, a write or a delete outside the
directory it belongs to. So names are checked against the forms megapico and pico-train write, every derived path
must resolve inside its root, copies refuse symbolic links, and files are written to a temporary name and renamed
(os.replace swaps a link itself, never writes through it).
"""

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, converted or resumed; one line naming the file and the fix."""


CHECKPOINT_TAG = re.compile(r"step_\d+|checkpoint")  # megapico's step_N; Lightning's DeepSpeed strategy's tag


def checkpoint_tag(text: str, source: Path) -> str:
    """A checkpoint tag read from `source` (a `latest` file): `step_N`, or pico-train's `checkpoint`."""
    tag = text.strip()
    if not CHECKPOINT_TAG.fullmatch(tag):
        raise CheckpointError(f"{source}: names checkpoint '{tag[:80]}', not a tag of the form step_N (or pico-train's "
                              f"'checkpoint'); refusing to follow it")
    return tag


def relative_entry(name: str, source: Path) -> str:
    """A file name listed in `source` (a manifest): relative, without '..', so it stays inside its directory."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts or name.startswith(("/", "\\")):
        raise CheckpointError(f"{source}: lists '{name[:80]}', which points outside its checkpoint; refusing it")
    return name


def inside(root: Path, path: Path) -> Path:
    """`path` if it resolves inside `root` (links followed), else a CheckpointError."""
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise CheckpointError(f"{path}: resolves to {resolved}, outside {base}; refusing it")
    return path


def copy_tree(source: Path, target: Path) -> None:
    """Copy a directory of plain files and folders; a symbolic link anywhere in it is an error naming it."""
    refuse_links(source)
    shutil.copytree(source, target, symlinks=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a new temporary sibling of `path` to write; it is renamed onto `path` when the block succeeds. The
    temporary is created here, under a random name (a received directory cannot have planted a link at it), with
    the permissions a plain new file would have."""
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.fchmod(descriptor, 0o666 & ~_umask())
    os.close(descriptor)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def fresh_directory(path: Path) -> Iterator[Path]:
    """Yield a new temporary sibling directory of `path` to fill (random name, created here, plain permissions);
    the caller renames it into place, or it is removed."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_links(run_dir: Path) -> None:
    """A received run directory holds plain files and folders: a symbolic link anywhere in it (but inside wandb's
    own folder, which keeps a `latest-run` link) would steer reads, writes or deletes elsewhere."""
    if run_dir.is_symlink():
        raise CheckpointError(f"{run_dir}: a symbolic link (to {os.readlink(run_dir)}); use the run directory itself")
    for root, directories, files in os.walk(run_dir):
        for name in [*directories, *files]:
            path = Path(root) / name
            if path.is_symlink():
                raise CheckpointError(f"{path}: a symbolic link (to {os.readlink(path)}); a run directory holds plain "
                                      f"files, refusing it (remove the link)")
        if Path(root) == run_dir and "wandb" in directories:
            directories.remove("wandb")


def write_text(path: Path, text: str) -> None:
    """Write a file into a run directory without following a link at its name."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def open_append(path: Path):  # noqa: ANN201
    """Open a log for appending, refusing a symbolic link at its name."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if path.is_symlink():
            raise CheckpointError(f"{path}: a symbolic link; refusing to append through it") from None
        raise err
    return os.fdopen(descriptor, "a")
