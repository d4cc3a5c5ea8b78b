#!/usr/bin/env bash
# A one-machine Ray cluster for trying the submit recipes: a head on 127.0.0.1 advertising the same role
# resources as the cloud clusters (driver, generator, learner, reward, sandbox), no token auth (local only).
#   cluster/jobs/local_cluster.sh start   ->  prints the RAY_ADDRESS line to export
#   cluster/jobs/local_cluster.sh stop    ->  stops this head only (not other Ray clusters on the machine), and
#                                            removes the socket folder its dashboard leaves in the temp dir
# Settings (environment): DASHBOARD_PORT (8265), RAY_PORT (6379), DASHBOARD_AGENT_PORT and RAY_CLIENT_PORT (free
# ports), NUM_CPUS (4
# logical CPUs: the actors of the tiny job share the cores), DSMATH_LOCAL_CLUSTER_DIR (the head's pid, log and
# Ray temp files).
set -euo pipefail
export RAY_AUTH_MODE=disabled
PORT="${DASHBOARD_PORT:-8265}"
GCS_PORT="${RAY_PORT:-6379}"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Ports other Ray instances on this machine may hold by default: free ones unless given.
AGENT_PORT="${DASHBOARD_AGENT_PORT:-$(free_port)}"
CLIENT_PORT="${RAY_CLIENT_PORT:-$(free_port)}"
STATE="${DSMATH_LOCAL_CLUSTER_DIR:-/tmp/dsmath-ray-$(id -u)}"
PIDFILE="$STATE/head.pid"
if (( ${#STATE} > 36 )); then   # Ray's socket paths under $STATE/ray/session_*/sockets must stay < 108 bytes
  echo "error: DSMATH_LOCAL_CLUSTER_DIR=$STATE is too long for Ray's socket paths (at most 36 characters)" >&2
  exit 2
fi

alive() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

wait_for_job_server() {  # the job server and the head's job agent answer, or the head died, or 120 s passed
  python3 - "$PORT" "$AGENT_PORT" "$(cat "$PIDFILE")" <<'EOF'
import os, sys, time, urllib.request
port, agent_port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
urls = [f"http://127.0.0.1:{port}/api/version", f"http://127.0.0.1:{agent_port}/api/healthz"]
end = time.monotonic() + 120
while time.monotonic() < end and urls:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("error: the Ray head exited while starting; see its log")
    try:
        with urllib.request.urlopen(urls[0], timeout=2) as r:
            if r.status == 200:
                urls.pop(0)
                continue
    except OSError:
        pass
    time.sleep(0.5)
if urls:
    sys.exit(f"error: {urls[0]} did not answer within 120 s")
EOF
}

head_pymp_dirs() {  # the multiprocessing socket folders (pymp-*) the head's processes listen in, one per line
  python3 - "$1" <<'EOF'
import os, sys
# Ray's dashboard starts its modules through a multiprocessing forkserver, whose socket folder in the temp dir goes
# only with a clean exit: a stopped head leaves it. Linux only (/proc); elsewhere nothing is found or removed.
session = sys.argv[1]
try:
    unix = open("/proc/net/unix").read().splitlines()[1:]
except OSError:
    sys.exit(0)
paths = {f[6]: f[7] for f in (line.split() for line in unix) if len(f) > 7 and "/pymp-" in f[7]}
found = set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        if stat[stat.rfind(")") + 2:].split()[3] != session:  # not in the head's session (`setsid ray start`)
            continue
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in paths:
                found.add(os.path.dirname(paths[target[8:-1]]))
    except OSError:
        continue
print("\n".join(sorted(found)))
EOF
}

case "${1:-start}" in
  start)
    mkdir -p "$STATE"
    if alive; then
      echo "a local head is already running (pid $(cat "$PIDFILE"))"
    else
      # --block keeps `ray start` in the foreground of its own session: stopping it stops exactly this head.
      setsid ray start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
        --num-cpus="${NUM_CPUS:-4}" --num-gpus=0 \
        --resources='{"driver": 1, "generator": 1, "learner": 1, "reward": 2, "sandbox": 2}' \
        --dashboard-host=127.0.0.1 --dashboard-port="$PORT" --include-dashboard=true \
        --dashboard-agent-listen-port="$AGENT_PORT" --ray-client-server-port="$CLIENT_PORT" \
        --temp-dir="$STATE/ray" --disable-usage-stats >"$STATE/head.log" 2>&1 &
      echo $! >"$PIDFILE"
      if ! wait_for_job_server; then
        tail -n 20 "$STATE/head.log" >&2
        exit 1
      fi
      echo "local Ray head up: dashboard and job server on http://127.0.0.1:$PORT (log: $STATE/head.log)"
    fi
    echo "export RAY_ADDRESS=http://127.0.0.1:$PORT RAY_AUTH_MODE=disabled"
    ;;
  stop)
    if ! alive; then
      echo "no local head running (nothing under $STATE)"
      rm -f "$PIDFILE"
      exit 0
    fi
    PID="$(cat "$PIDFILE")"
    LEFTOVERS="$(head_pymp_dirs "$PID")"
    kill -TERM "$PID"   # `ray start --block` shuts down the processes it started
    for _ in $(seq 60); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$PID" 2>/dev/null || true   # whatever of the head's session is left
    while IFS= read -r dir; do if [[ -n "$dir" ]]; then rm -rf -- "$dir"; fi; done <<<"$LEFTOVERS"   # and left in the temp dir
    rm -f "$PIDFILE"
    echo "local Ray head stopped"
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
