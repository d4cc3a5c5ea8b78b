#!/usr/bin/env bash
# bench/gpu_check.sh — the ONE script a session with a GPU runs: the gpu-marked tests, then the GPU learner card.
#
# Where: a bare CUDA machine with torch + transformers (+ pytest) but no Ray, no vLLM, no DeepSpeed and no
# registry (e.g. the workplace's nvidia-h200 kind: Python 3.12, x86-64). DeepSpeed and its two missing needs
# (hjson, pydantic 2) travel as wheels in .whl/ (git-ignored; 64 MiB carry limit: these are ~5 MiB).
#
# Build the wheels folder here, once, from the repo root (DeepSpeed with DS_BUILD_OPS=0 is pure Python):
#   mkdir -p .whl
#   DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#       hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       typing-extensions==4.16.0
#   (pydantic-core is the only compiled one: it must match the GPU machine's Python, 3.12 there.)
#
# Run it there through the device tool, carrying the wheels:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Outputs under $OUT (default ./gpu_check_out): gpu_check.log (machine, versions, install), gpu_tests.log +
# gpu_tests.xml (pytest), gpu_learner_card.md + gpu_learner.json + gpu_learner.log (the bench card).
# Budget: tests <= 240 s, bench <= 330 s (each arm <= 150 s): the whole script ends inside one 10-minute call.
# Exit status: 0 only when the tests and every bench arm passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# tests/conftest.py defaults the CPU stack's "cpu" only where it is unset. GPU_CHECK_BENCH_ARGS: extra bench flags
# (tests/test_bench_gpu_learner.py runs this script on CPU with DS_ACCELERATOR=cpu and "--tiny --steps 1").
export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not available"
  if ! "$PY" -c "import deepspeed" 2>/dev/null; then
    # With dependency resolution against what the machine has; else every carried wheel as it is.
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" deepspeed hjson pydantic \
      || "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
  fi
  "$PY" - <<'EOF'
import importlib.util, platform
import torch, transformers, deepspeed
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
print("ray present:", importlib.util.find_spec("ray") is not None, "| vllm present:", importlib.util.find_spec("vllm") is not None)
EOF
} 2>&1 | tee "$OUT/gpu_check.log"

timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
  tests/test_gpu_learner.py tests/test_weight_sync.py 2>&1 | tee "$OUT/gpu_tests.log"
rc_tests=${PIPESTATUS[0]}

timeout 330 "$PY" bench/gpu_learner.py --arm-timeout 150 ${GPU_CHECK_BENCH_ARGS:-} --out "$OUT/gpu_learner_card.md" \
  --json "$OUT/gpu_learner.json" 2>&1 | tee "$OUT/gpu_learner.log"
rc_bench=${PIPESTATUS[0]}

echo "gpu_check: tests exit $rc_tests, bench exit $rc_bench" | tee -a "$OUT/gpu_check.log"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
