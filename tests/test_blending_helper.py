"""The compiled blending helper: built privately, and never loaded from a cache another user could have written.

Tests run as root here, so "another user" is simulated by chowning to an unused uid and "writable by others" by
chmod; the helper is rebuilt per test because MEGAPICO_CACHE points into tmp_path.
"""

import ctypes
import os
import shutil
import stat
import subprocess

import numpy as np
import pytest

from megapico.data import blended_dataset
from megapico.data.blended_dataset import UnsafeCacheError, build_blending_indices

OTHER_UID = 12345
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the helper")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a file to another uid")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache" / "megapico"
    monkeypatch.setenv("MEGAPICO_CACHE", str(directory))
    return directory


def reference_blending(weights, size):
    """The documented rule: next from the d maximising w_d * max(i, 1) - count_d, ties to the lowest d."""
    weights = [w / sum(weights) for w in weights]
    counts = [0] * len(weights)
    dataset_index, sample_index = [], []
    for i in range(size):
        errors = [w * max(i, 1) - c for w, c in zip(weights, counts, strict=True)]
        best = errors.index(max(errors))
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return dataset_index, sample_index


def planted_library(tmp_path, marker):
    """A shared library whose constructor creates `marker`: it exists if and only if the library was loaded."""
    source = tmp_path / "planted.c"
    source.write_text('#include <stdio.h>\n'
                      '__attribute__((constructor)) static void planted(void) {\n'
                      f'    FILE *f = fopen("{marker}", "w"); if (f) fclose(f);\n'
                      '}\n')
    built = tmp_path / "planted.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(built), str(source)], check=True, capture_output=True)
    return built


def refused(path, match):
    """Assert that asking for the helper raises one line naming `path`, the problem and the fix."""
    with pytest.raises(UnsafeCacheError, match=match) as caught:
        blended_dataset._compiled_helper()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: refused, ")
    assert "set MEGAPICO_CACHE to a directory only you can write" in message


@needs_gcc
@pytest.mark.parametrize("weights", [[0.3, 0.5, 0.2], [1.0, 3.0], [0.1, 0.1, 0.1, 0.7], [5.0]])
def test_fresh_build_is_private_and_matches_the_python_loop(cache, monkeypatch, weights):
    size = 2000
    dataset_index, sample_index = build_blending_indices(np.array(weights), size)
    library = blended_dataset._library_path(cache)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    info = os.lstat(library)
    assert stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o700
    assert [p.name for p in cache.iterdir()] == [library.name]  # the temporary build directory is gone
    assert blended_dataset._compiled_helper() is not None

    expected_index, expected_sample = reference_blending(weights, size)
    np.testing.assert_array_equal(dataset_index, expected_index)
    np.testing.assert_array_equal(sample_index, expected_sample)
    monkeypatch.setattr(blended_dataset, "_compiled_helper", lambda: None)
    python_index, python_sample = build_blending_indices(np.array(weights), size)
    np.testing.assert_array_equal(dataset_index, python_index)
    np.testing.assert_array_equal(sample_index, python_sample)


@needs_gcc
def test_an_existing_private_library_is_reused(cache):
    assert blended_dataset._compiled_helper() is not None
    inode = os.lstat(blended_dataset._library_path(cache)).st_ino
    assert blended_dataset._compiled_helper() is not None
    assert os.lstat(blended_dataset._library_path(cache)).st_ino == inode


def test_without_a_compiler_it_falls_back_to_python(cache, monkeypatch):
    monkeypatch.setenv("PATH", str(cache.parent / "no-bin-here"))
    assert blended_dataset._compiled_helper() is None
    dataset_index, sample_index = build_blending_indices(np.array([0.25, 0.75]), 100)
    expected_index, expected_sample = reference_blending([0.25, 0.75], 100)
    np.testing.assert_array_equal(dataset_index, expected_index)
    np.testing.assert_array_equal(sample_index, expected_sample)


@needs_gcc
@needs_root
def test_a_library_owned_by_another_user_is_refused_and_never_runs(cache, tmp_path):
    marker = tmp_path / "planted-code-ran"
    planted = planted_library(tmp_path, marker)
    probe = tmp_path / "probe" / "planted.so"  # first show that loading it really would create the marker
    probe.parent.mkdir()
    shutil.copy(planted, probe)
    ctypes.CDLL(str(probe))
    assert marker.exists()
    marker.unlink()

    cache.mkdir(parents=True, mode=0o700)
    library = blended_dataset._library_path(cache)
    shutil.copy(planted, library)
    os.chmod(library, 0o700)
    os.chown(library, OTHER_UID, -1)
    refused(library, f"owned by uid {OTHER_UID}")
    with pytest.raises(UnsafeCacheError):
        build_blending_indices(np.array([0.5, 0.5]), 10)  # no quiet fallback to Python either
    assert not marker.exists()
    assert os.lstat(library).st_uid == OTHER_UID  # left in place for the user to look at, not replaced


@needs_gcc
@pytest.mark.parametrize("mode", [0o720, 0o702, 0o777])
def test_a_library_writable_by_group_or_others_is_refused(cache, tmp_path, mode):
    marker = tmp_path / "planted-code-ran"
    cache.mkdir(parents=True, mode=0o700)
    library = blended_dataset._library_path(cache)
    shutil.copy(planted_library(tmp_path, marker), library)
    os.chmod(library, mode)
    refused(library, f"writable by group/others \\(mode {mode:o}\\)")
    assert not marker.exists()


@needs_gcc
def test_a_symlinked_library_is_refused(cache, tmp_path):
    marker = tmp_path / "planted-code-ran"
    cache.mkdir(parents=True, mode=0o700)
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy(planted_library(tmp_path, marker), elsewhere)
    os.chmod(elsewhere, 0o700)
    library = blended_dataset._library_path(cache)
    library.symlink_to(elsewhere)
    refused(library, "a symlink")
    assert not marker.exists()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_a_cache_directory_writable_by_group_or_others_is_refused(cache, mode):
    cache.mkdir(parents=True)
    os.chmod(cache, mode)
    refused(cache, "writable by group/others")
    assert list(cache.iterdir()) == []  # nothing was built into it


@needs_root
def test_a_cache_directory_owned_by_another_user_is_refused(cache):
    cache.mkdir(parents=True, mode=0o700)
    os.chown(cache, OTHER_UID, -1)
    refused(cache, f"owned by uid {OTHER_UID}")
    assert list(cache.iterdir()) == []


def test_a_new_cache_directory_is_created_private(cache):
    old = os.umask(0o002)  # even under a permissive umask
    try:
        blended_dataset._compiled_helper()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
