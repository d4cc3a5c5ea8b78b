#!/usr/bin/env bash
# Submit the default tiny CPU job (the tiny_cpu preset) to a cluster: a smoke test of the cluster set-up.
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/jobs/submit_tiny.sh [extra dotted overrides...]
source "$(dirname "$0")/common.sh"
# The driver sits on the node advertising the `driver` role, as on the cloud clusters (local_cluster.sh has it).
exec ray job submit --address "$RAY_ADDRESS" \
  --working-dir . --runtime-env cluster/runtime_env.yaml \
  --entrypoint-resources '{"driver": 1}' \
  -- dsmath train "$@"
