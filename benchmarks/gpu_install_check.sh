#!/usr/bin/env bash
# GPU install check (issues 18 and 12): on a machine whose python3 already has a CUDA torch, install headscope
# without replacing it, run the same analysis with --device cuda and --device-map auto, and rerun the
# device-map run from the command its JSON records. Run from the repository root, with $OUT set to a folder.
# A machine that cannot reach PyPI needs the pure-Python dependencies it lacks as wheels in dist/whl first, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d dist/whl altair narwhals jsonschema jsonschema-specifications \
#     referencing rpds-py vl-convert-python
# (the bundled model's 83 MB wheel is left out: the check loads tiny checkpoints, never `auto`).
set -uo pipefail
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
test -f reports/provenance.py || { echo "run from a headscope checkout that has reports/provenance.py"; exit 3; }
REPO=$PWD
python3 -c "import sys,torch,transformers,accelerate;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',torch.cuda.is_available(),'transformers',transformers.__version__,'accelerate',accelerate.__version__)"
python3 -m venv --system-site-packages --without-pip /tmp/v
P=/tmp/v/bin/python
PIP="python3 -m pip --python $P"
$PIP install -q --no-index --no-deps dist/whl/*.whl || echo "WHEELS FAILED"
# what `pip install .` would do on this CUDA machine, for every declared dependency but the 83 MB bundled model
REQS=$($P -c "import tomllib;d=tomllib.load(open('pyproject.toml','rb'))['project']['dependencies'];print('\n'.join(r.split('#')[0].strip() for r in d if not r.startswith('gt-all')))")
echo "$REQS" > /tmp/reqs.txt
$PIP install --dry-run --no-index --find-links dist/whl --quiet --report $OUT/plan.json -r /tmp/reqs.txt; echo "dry-run rc=$?"
$P -c "import json;print('would install:',[i['metadata']['name']+' '+i['metadata']['version'] for i in json.load(open('$OUT/plan.json'))['install']])"
$PIP install -q --no-index --no-deps --no-build-isolation . ; echo "install rc=$?"
$P -c "import torch;print('torch after install',torch.__version__)"
mkdir -p /tmp/ck && cd /tmp && PYTHONPATH=$REPO $P -c "
from pathlib import Path
from tests.checkpoints import tiny_gpt2, tiny_llama
tiny_gpt2(Path('/tmp/ck/gpt2')); tiny_llama(Path('/tmp/ck/llama'))" 2>&1 | tail -2
H=/tmp/v/bin/headscope
$H --help | head -2
$H --model /tmp/ck/gpt2 --device cuda --all-layers --json $OUT/cuda.json --html $OUT/cuda.html; echo "cuda rc=$?"
$H --model /tmp/ck/gpt2 --device cpu --all-layers --json /tmp/cpu.json; echo "cpu rc=$?"
$H --model /tmp/ck/llama --device-map auto --layer 0 --layer 1 --json $OUT/map.json; echo "map rc=$?"
$H --model /tmp/ck/llama --device cuda --dtype bfloat16 --all-layers --json $OUT/bf16.json; echo "bf16 rc=$?"
$P - <<'PY'
import json, os, shlex, subprocess
import numpy as np
out = os.environ["OUT"]
cuda, cpu = json.load(open(f"{out}/cuda.json")), json.load(open("/tmp/cpu.json"))
print("cuda device", cuda["model"]["device"], "warnings", cuda["warnings"], "provenance", cuda["provenance"]["command"][-60:])
worst = max(float(np.max(np.abs(np.asarray(cuda["layers"][l][f], float) - np.asarray(cpu["layers"][l][f], float))))
            for l in cuda["layers"] for f in ("q_means", "q_stds", "same_head_dp", "final_to_prev", "sink_mass"))
print("cuda vs cpu max abs diff", worst, "parity", [cuda["layers"][l]["parity_max_abs_err"] for l in cuda["layers"]])
m = json.load(open(f"{out}/map.json"))
cmd = m["provenance"]["command"]
print("device-map model", m["model"]["device"], m["model"]["device_map"], "command", cmd[:40], "...", cmd[-80:])
argv = shlex.split(cmd)[3:]
argv[argv.index("--json") + 1] = "/tmp/again.json"
r = subprocess.run(["/tmp/v/bin/headscope", *argv], capture_output=True, text=True)
print("rerun rc", r.returncode, r.stderr.strip()[-200:])
again = json.load(open("/tmp/again.json"))
again.pop("provenance"); m.pop("provenance")
print("rerun identical", again == m)
b = json.load(open(f"{out}/bf16.json"))
print("bf16 parity", [b["layers"][l]["parity_max_abs_err"] for l in b["layers"]], "warnings", b["warnings"])
PY
