#!/usr/bin/env bash
# A one-machine Ray cluster for trying the submit recipes (no token auth: local only, 127.0.0.1).
#   cluster/jobs/local_cluster.sh start   ->  prints RAY_ADDRESS to export
#   cluster/jobs/local_cluster.sh stop
set -euo pipefail
export RAY_AUTH_MODE=disabled
case "${1:-start}" in
  start)
    PORT="${DASHBOARD_PORT:-8265}"
    ray start --head --node-ip-address=127.0.0.1 --num-cpus="${NUM_CPUS:-2}" --num-gpus=0 \
      --resources='{"driver": 1, "generator": 1, "learner": 1, "reward": 2, "sandbox": 2}' \
      --dashboard-host=127.0.0.1 --dashboard-port="$PORT" --include-dashboard=true
    echo "export RAY_ADDRESS=http://127.0.0.1:$PORT RAY_AUTH_MODE=disabled"
    ;;
  stop) ray stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
