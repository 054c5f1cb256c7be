"""What code computed a result: headscope's git commit, which a result's provenance names beside its version number
(the version stays the same across commits that change the numbers): git's HEAD in a checkout, else the commit an
installed wheel was built from (setup.py's build hook writes it beside this module); and the versions of the
libraries that computed the numbers (COMPUTING), which every record names, each adding those that wrote it. Here,
not in reports, so that analysis's results folders record them too (analysis.corpus_store: each run's)."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the checkout, or site-packages once installed
COMMIT_FILE = Path(__file__).with_name("_build_commit.txt")  # written by setup.py's build hook into a wheel
COMPUTING = ("torch", "transformers", "tokenizers", "numpy", "scipy")  # what tokenizes, runs and measures a text


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """{name: installed version, None if not installed} of COMPUTING and then `extra` (the libraries that wrote the
    record: renderers, storage). Reads package metadata; imports nothing."""
    found = {}
    for name in COMPUTING + extra:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@functools.cache
def git_commit() -> str | None:
    """headscope's commit: git's HEAD in a checkout, else the commit the installed wheel was built from, else None.

    Only a checkout whose top level holds headscope's pyproject.toml counts, so a virtual environment inside some
    other repository never reports that repository's commit.
    """
    if (PACKAGE_ROOT / "pyproject.toml").is_file():
        try:
            out = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "rev-parse", "--show-toplevel", "HEAD"],
                                 capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        lines = out.stdout.split() if out is not None and out.returncode == 0 else []
        if len(lines) == 2 and Path(lines[0]).resolve() == PACKAGE_ROOT:
            return lines[1] + ("-dirty" if _modified() else "")  # git describe's mark: the code is not that commit's
    try:
        return COMMIT_FILE.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _modified() -> bool:
    """Whether the checkout's tracked files differ from its HEAD (edits not committed change the numbers)."""
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())
