"""Build hook only (the package is declared in pyproject.toml): record the git commit a wheel is built from.

A report's provenance names headscope's commit. From a checkout it asks git; an installed copy has no git
history, so the build writes the commit next to the code (analysis/commit.py reads it).
"""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

COMMIT_FILE = Path("analysis") / "_build_commit.txt"


class BuildPyWithCommit(build_py):
    def run(self):
        super().run()
        source = Path(__file__).resolve().parent
        try:
            out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=source, capture_output=True,
                                 check=False, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return
        lines = out.stdout.split() if out.returncode == 0 else []
        # only headscope's own repository: an unpacked source inside some other repository has no commit
        commit = lines[1] if len(lines) == 2 and Path(lines[0]).resolve() == source else ""
        if commit and not self.dry_run:
            (Path(self.build_lib) / COMMIT_FILE).write_text(commit + "\n", encoding="utf-8")


setup(cmdclass={"build_py": BuildPyWithCommit})
