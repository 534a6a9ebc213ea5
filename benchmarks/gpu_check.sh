#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (a lent GPU machine is held by the minute):
# the GPU tests, the benchmark in the GPU's default precision, the precision table, then the
# whole suite with CUDA visible (what a lease leaves time for). Logs go to OUTDIR.
#
#     bash benchmarks/gpu_check.sh OUTDIR [PYTEST ARGS for the whole suite, e.g. -k "not web_page"]
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR [PYTEST ARGS]}
shift
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
stage() { echo "== $1 ($(date +%T))"; }

stage environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, faiss, lancedb; print('torch', torch.__version__, 'transformers', transformers.__version__, 'faiss', faiss.__version__, 'faiss gpus', getattr(faiss, 'get_num_gpus', lambda: 0)(), 'lancedb', lancedb.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$out/gpu.txt"

stage "GPU tests, and the CPU tests of what the GPU path uses"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_loader.py tests/test_model_fidelity.py tests/test_rerank_cache.py 2>&1 | tee "$out/test_gpu.log"

stage "benchmark, default precision"
timeout 240 python3 benchmarks/bench.py --images 512 --pairs 128 --batch-size 64 2>&1 | tee "$out/bench_auto.txt"

stage "precision"
timeout 120 python3 benchmarks/precision.py 2>&1 | tee "$out/precision.txt"

stage "whole suite, CUDA visible"
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist, where installed
timeout 300 python3 -m pytest -q -p no:cacheprovider $parallel "$@" 2>&1 | tee "$out/suite.log"
stage done
