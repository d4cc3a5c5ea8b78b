# Shared by the submit recipes: where the cluster is, and the checks every submission runs first.
# RAY_ADDRESS: the job server (dashboard port 8265), e.g. after `ray dashboard cluster/aws-gpu.yaml`
# or `kubectl port-forward svc/dsmath-7b-head-svc 8265:8265`.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
cd "$REPO_ROOT"

# Ray >= 2.60 enables token auth by default. Remote clusters: keep it on and have the token locally
# (~/.ray/auth_token, the one shipped by file_mounts, or RAY_AUTH_TOKEN). A local `ray start` for testing:
# RAY_AUTH_MODE=disabled on both sides.
if [[ "${RAY_AUTH_MODE:-token}" != "disabled" && -z "${RAY_AUTH_TOKEN:-}" && ! -f "$HOME/.ray/auth_token" ]]; then
  echo "error: Ray token auth is on but no token found: run 'ray get-auth-token --generate' (or set RAY_AUTH_TOKEN," \
       "or RAY_AUTH_MODE=disabled for a local test cluster)" >&2
  exit 2
fi

# Refuse to submit an upload Ray would reject (size over the GCS limit), before zipping it.
python -m wiring.jobsubmit . --runtime-env cluster/runtime_env.yaml
