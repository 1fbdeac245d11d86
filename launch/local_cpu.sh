#!/usr/bin/env bash
# N local processes of one sod_jax job on fake CPU devices: a multi-host run on one machine.
# See --help and launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local_cpu.sh N CONFIG [section.key=value ...]

Starts N local processes of

    ${PYTHON:-python} -m ${MODULE:-sod_jax.train} --config CONFIG [overrides ...]

as one multi-process JAX job on this machine: each process sees DEVICES_PER_PROCESS fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=K, JAX_PLATFORMS=cpu) and joins the
cluster through JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i
(the variables sod_jax.parallel.detect_cluster reads). Each process's output goes to
LOG_DIR/proc_<i>.log and, prefixed with [p<i>], to this terminal; its pid is in LOG_DIR/proc_<i>.pid.

The script waits for all processes. When one exits non-zero, the others get SIGTERM, then SIGKILL
after KILL_GRACE_S seconds, and the script exits with that process's status. SIGTERM and SIGINT
sent to the script are forwarded to every process (the training CLIs then save a checkpoint at the
step boundary and exit 0; a second signal makes them exit at once).

Environment:
  PYTHON               interpreter (default: python)
  MODULE               module to run with -m (default: sod_jax.train; also sod_jax.sft, sod_jax.eval)
  DEVICES_PER_PROCESS  fake CPU devices per process (default: 2)
  PORT                 coordinator port on 127.0.0.1 (default: a free port)
  LOG_DIR              logs and pid files (default: <out_dir>/launch_logs, where out_dir is the
                       train.out_dir / sft.out_dir / eval.out_dir of the overrides or the config
                       file, else the config default; ./launch_logs for a gs:// out_dir)
  KILL_GRACE_S         seconds between SIGTERM and SIGKILL when stopping the others (default: 10)

Example:
  launch/local_cpu.sh 2 configs/demo.yaml train.total_steps=3 train.out_dir=runs/demo_2proc
EOF
}

log() { echo "[launch] $*" >&2; }

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 0
fi
if [[ $# -lt 2 ]]; then
  usage >&2
  exit 2
fi

N="$1"
CONFIG="$2"
shift 2
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
  log "N must be a positive integer, got '$N'"
  exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
MODULE="${MODULE:-sod_jax.train}"
DEVICES="${DEVICES_PER_PROCESS:-2}"
GRACE="${KILL_GRACE_S:-10}"
# A helper interpreter for the port and the out_dir (PYTHON may be a test double).
HELPER_PY="$(command -v python3 || command -v python || true)"

# The run directory the module writes to: an override wins, then the config file, then the default.
case "$MODULE" in
  sod_jax.sft) SECTION="sft"; DEFAULT_OUT="runs/sft" ;;
  sod_jax.eval) SECTION="eval"; DEFAULT_OUT="runs/eval" ;;
  *) SECTION="train"; DEFAULT_OUT="runs/sod" ;;
esac
out_dir() {
  local arg found=""
  for arg in "$@"; do
    if [[ "$arg" == "$SECTION.out_dir="* ]]; then
      found="${arg#*=}"
    fi
  done
  if [[ -z "$found" && -f "$CONFIG" && -n "$HELPER_PY" ]]; then
    found="$("$HELPER_PY" - "$CONFIG" "$SECTION" 2>/dev/null <<'PYEOF' || true
import sys
import yaml
cfg = yaml.safe_load(open(sys.argv[1])) or {}
out = (cfg.get(sys.argv[2]) or {}).get("out_dir")
print(out or "")
PYEOF
)"
  fi
  echo "${found:-$DEFAULT_OUT}"
}
if [[ -z "${LOG_DIR:-}" ]]; then
  LOG_DIR="$(out_dir "$@")"
  [[ "$LOG_DIR" != *://* ]] || LOG_DIR="."  # a gs:// run directory: the logs stay local
  LOG_DIR="$LOG_DIR/launch_logs"
fi
mkdir -p "$LOG_DIR"

if [[ -n "${PORT:-}" ]]; then
  port="$PORT"
elif [[ -n "$HELPER_PY" ]]; then
  port="$("$HELPER_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
else
  log "no python3 to pick a free port: set PORT"
  exit 2
fi

# XLA_FLAGS of the environment are kept, with the device count replaced.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$DEVICES"

# setsid: the processes do not share the terminal's process group, so Ctrl-C reaches them once,
# through the forwarding below, not twice.
SETSID=()
if command -v setsid >/dev/null 2>&1; then
  SETSID=(setsid)
fi

pids=()
tails=()
declare -a done_rc=()
# shellcheck disable=SC2317  # called by the traps
forward() {
  local sig="$1" i
  log "SIG$sig: forwarding to all $N processes"
  for i in "${!pids[@]}"; do
    if [[ -z "${done_rc[i]:-}" ]]; then
      kill -s "$sig" "${pids[i]}" 2>/dev/null || true
    fi
  done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

log "$N processes of python -m $MODULE --config $CONFIG $*; coordinator 127.0.0.1:$port; logs in $LOG_DIR"
for ((i = 0; i < N; i++)); do
  logfile="$LOG_DIR/proc_$i.log"
  : >"$logfile"
  # `trap -`: a background command of a script starts with SIGINT ignored; the processes get the defaults.
  (
    trap - INT QUIT
    exec env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" \
      JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
      PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
      "${SETSID[@]}" "$PY" -m "$MODULE" --config "$CONFIG" "$@"
  ) >"$logfile" 2>&1 </dev/null &
  pids[i]=$!
  echo "${pids[i]}" >"$LOG_DIR/proc_$i.pid"
  tail --pid="${pids[i]}" -s 0.2 -n +1 -F "$logfile" 2>/dev/null | sed -u "s/^/[p$i] /" &
  tails[i]=$!
done

# Wait for every process; the first non-zero exit stops the others.
failed=""
remaining=$N
while ((remaining > 0)); do
  for ((i = 0; i < N; i++)); do
    [[ -z "${done_rc[i]:-}" ]] || continue
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      rc=0
      wait "${pids[i]}" 2>/dev/null || rc=$?
      done_rc[i]=$rc
      remaining=$((remaining - 1))
      if ((rc != 0)) && [[ -z "$failed" ]]; then
        failed=$i
        log "process $i exited with status $rc; stopping the others"
        break 2
      fi
    fi
  done
  sleep 0.2
done

if [[ -n "$failed" ]]; then
  for ((i = 0; i < N; i++)); do
    [[ -n "${done_rc[i]:-}" ]] || kill -s TERM "${pids[i]}" 2>/dev/null || true
  done
  deadline=$((SECONDS + GRACE))
  while ((SECONDS < deadline)); do
    alive=0
    for ((i = 0; i < N; i++)); do
      if [[ -z "${done_rc[i]:-}" ]] && kill -0 "${pids[i]}" 2>/dev/null; then
        alive=1
      fi
    done
    ((alive)) || break
    sleep 0.2
  done
  for ((i = 0; i < N; i++)); do
    if [[ -z "${done_rc[i]:-}" ]]; then
      if kill -0 "${pids[i]}" 2>/dev/null; then
        log "process $i did not stop within ${GRACE}s: SIGKILL"
        kill -s KILL "${pids[i]}" 2>/dev/null || true
      fi
      rc=0
      wait "${pids[i]}" 2>/dev/null || rc=$?
      done_rc[i]=$rc
    fi
  done
fi

wait "${tails[@]}" 2>/dev/null || true
status=0
[[ -z "$failed" ]] || status=${done_rc[failed]}
log "exit statuses: ${done_rc[*]}"
exit "$status"
