"""The package map of docs/architecture.md holds: each megapico package imports only packages listed before it."""

import re

from conftest import REPO

ORDER = ["config", "parallel", "model", "data", "checkpoint", "analysis", "training", "convert", "publish"]


def test_no_package_imports_one_above_it():
    upward = []
    for path in (REPO / "megapico").rglob("*.py"):
        package = path.relative_to(REPO / "megapico").parts[0]
        if package not in ORDER:
            continue
        for match in re.finditer(r"^\s*(?:from|import) megapico\.(\w+)", path.read_text(), re.M):
            if ORDER.index(match.group(1)) > ORDER.index(package):
                upward.append(f"{path.relative_to(REPO)} imports megapico.{match.group(1)}")
    assert upward == []
    assert sorted(p.name for p in (REPO / "megapico").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        ORDER)
