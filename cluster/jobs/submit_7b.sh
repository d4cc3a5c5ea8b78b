#!/usr/bin/env bash
# Submit the paper's GRPO recipe (dsmath/configs/deepseekmath_7b.yaml) to a running cluster.
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/jobs/submit_7b.sh [extra dotted overrides...]
# Then: ray job logs -f <id>   ·   dsmath status --job <id> --address $RAY_ADDRESS   ·   ray job stop <id>
# The model is a folder on the learner's node (nothing is downloaded at run time): MODEL_PATH=... or model.path=...
MODEL_PATH="${MODEL_PATH:-}"
if [[ -z "$MODEL_PATH" && " $* " != *" model.path="* ]]; then
  echo "error: set MODEL_PATH=/models/deepseek-math-7b-instruct (a model folder on the cluster) or pass model.path=..." >&2
  exit 2
fi
source "$(dirname "$0")/common.sh"
exec ray job submit --address "$RAY_ADDRESS" --no-wait \
  --working-dir . --runtime-env cluster/runtime_env.yaml \
  --entrypoint-resources '{"driver": 1}' \
  -- dsmath train --config deepseekmath_7b ${MODEL_PATH:+"model.path=$MODEL_PATH"} status.host=0.0.0.0 status.port=50051 status.prometheus_port=9400 "$@"
