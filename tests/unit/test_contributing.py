"""CONTRIBUTING.md speaks of the project, not of one machine, and its architecture map stays current."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_contributor_notes_have_no_machine_paths_and_the_readme_links_them():
    text = (REPO / "CONTRIBUTING.md").read_text()
    assert not re.search(r"(?<![\w.])/(work|home|Users|tmp|root|mnt)/", text), "a path of one machine"
    assert not re.search(r"\b[A-Z]:\\\\", text)
    assert "(CONTRIBUTING.md)" in (REPO / "README.md").read_text()
    for heading in ("## Architecture", "## Tests", "## Rules", "### A storage backend", "### A model", "### A task",
                    "### A parallelism"):
        assert heading in text


def test_every_package_of_the_tree_is_on_the_architecture_map():
    text = (REPO / "CONTRIBUTING.md").read_text()
    packages = sorted(p.parent.relative_to(REPO / "dist_train") for p in (REPO / "dist_train").rglob("__init__.py")
                      if p.parent != REPO / "dist_train" and "__pycache__" not in p.parts)
    missing = [str(p) for p in packages if f"{p.name}/" not in text]
    assert not missing, f"packages missing from CONTRIBUTING.md's map: {missing}"
