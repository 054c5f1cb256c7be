#!/usr/bin/env bash
# The GPU checks and benchmarks, as one script for an offline GPU machine (../shared/GPU.md): run from the
# project root with the .whl folder carried (transformers==5.23.0 is all it needs; TransformerLens 4.3 and the
# dependencies of it that the machine lacks, where .whl/tl holds them, add the run_with_cache comparison);
# writes under $OUT.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-site .whl/transformers-5.23.0-*.whl \
  $(ls .whl/tl/*.whl 2>/dev/null) && export PYTHONPATH=/tmp/gpu-site || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 90 python3 -m benchmarks.gpu_check 2>&1 | grep -v Warning | tee "$OUT/check.txt"
timeout 150 python3 -m benchmarks.bench_analysis --device cuda --shape llama-0.7b --tokens 1024 2048 4096 \
  --runs 3 --corpus-texts 1000 --corpus-batch-sizes 1 32 128 2>&1 | grep -v Warning | tee "$OUT/bench_llama.txt"
timeout 150 python3 -m benchmarks.bench_analysis --device cuda --shape gpt2-small --tokens 256 1024 \
  --runs 3 --corpus-texts 1000 --corpus-batch-sizes 1 32 128 2>&1 | grep -v Warning | tee "$OUT/bench_gpt2.txt"
timeout 90 python3 -m benchmarks.gpu_profile --shape llama-0.7b --tokens 1024 4096 2>&1 | grep -v Warning \
  | tee "$OUT/profile_llama.txt"
