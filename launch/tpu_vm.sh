#!/usr/bin/env bash
# Run one sod_jax job on every worker of an existing Cloud TPU VM slice. See --help and launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name TPU --zone ZONE [options] CONFIG [section.key=value ...]
       launch/tpu_vm.sh --name TPU --zone ZONE --stop

Runs `python -m sod_jax.train --config CONFIG [overrides ...]` on every worker of an existing TPU
VM slice (one process per host; each process finds the slice by itself, no distributed.* key is
needed), through `gcloud compute tpus tpu-vm ssh/scp ... --worker=all`:

  1. stop: stale sod_jax jobs (train, sft, eval, generate) get SIGTERM, then SIGKILL after
     STOP_GRACE_S; the libtpu lock file /tmp/libtpu_lockfile is removed;
  2. sync: this checkout (without .git, runs/, caches) is copied to REMOTE_DIR on every worker;
  3. install: pip install -r requirements.txt "jax[tpu]==<the jax version requirements.txt pins>";
  4. start: the job runs under nohup, its output in REMOTE_DIR/launch_logs/<hostname>.log on each
     worker (with --attach: in the foreground, its output streamed here).

If the start fails on any worker (with --attach: the job exits non-zero on any worker), every
worker gets the stop of step 1 and the script exits non-zero. Detached, a start counts as failed
when the process is gone START_CHECK_S seconds after it was started.

Options (or the environment variable in brackets):
  --name NAME          TPU VM name [TPU_NAME]
  --zone ZONE          zone [ZONE]
  --project PROJECT    project [PROJECT]; default: gcloud's configured project
  --module MODULE      module to run with -m [MODULE]; default sod_jax.train (also sod_jax.sft, sod_jax.eval)
  --remote-dir DIR     code directory on the workers, relative to the home directory or absolute
                       [REMOTE_DIR]; default sod_jax
  --python PY          interpreter on the workers [REMOTE_PYTHON]; default python3
  --env KEY=VALUE      environment variable for the job (repeatable), e.g. --env WANDB_API_KEY=...
  --skip-sync          do not copy the code
  --skip-install       do not run pip
  --attach             run the job in the foreground of the ssh session
  --stop               only step 1 on every worker (SIGTERM lets a training job save a checkpoint first)
  -h, --help           this text
Environment only: STOP_GRACE_S (default 60), START_CHECK_S (default 20), GCLOUD (default gcloud).

Example:
  launch/tpu_vm.sh --name my-v5e-16 --zone us-west4-a configs/sod_qwen3_1.7b.yaml \
      train.out_dir=gs://my-bucket/runs/sod_1.7b model.path=/data/sft_qwen3_1.7b/model
EOF
}

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

NAME="${TPU_NAME:-}"
ZONE_="${ZONE:-}"
PROJECT_="${PROJECT:-}"
MODULE_="${MODULE:-sod_jax.train}"
REMOTE_DIR_="${REMOTE_DIR:-sod_jax}"
RPY="${REMOTE_PYTHON:-python3}"
GCLOUD_="${GCLOUD:-gcloud}"
STOP_GRACE="${STOP_GRACE_S:-60}"
START_CHECK="${START_CHECK_S:-20}"
SYNC=1
INSTALL=1
ATTACH=0
STOP_ONLY=0
JOB_ENV=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE_="${2:?--zone needs a value}"; shift 2 ;;
    --project) PROJECT_="${2:?--project needs a value}"; shift 2 ;;
    --module) MODULE_="${2:?--module needs a value}"; shift 2 ;;
    --remote-dir) REMOTE_DIR_="${2:?--remote-dir needs a value}"; shift 2 ;;
    --python) RPY="${2:?--python needs a value}"; shift 2 ;;
    --env)
      [[ "${2:-}" == *=* ]] || die "--env needs KEY=VALUE"
      JOB_ENV+=("$2"); shift 2 ;;
    --skip-sync) SYNC=0; shift ;;
    --skip-install) INSTALL=0; shift ;;
    --attach) ATTACH=1; shift ;;
    --stop) STOP_ONLY=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done

[[ -n "$NAME" ]] || { usage >&2; die "--name (or TPU_NAME) is required"; }
[[ -n "$ZONE_" ]] || die "--zone (or ZONE) is required"
if ((STOP_ONLY == 0)); then
  [[ $# -ge 1 ]] || { usage >&2; die "CONFIG is required"; }
  CONFIG="$1"
  shift
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_VERSION="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$REPO/requirements.txt" | head -n 1)"
[[ -n "$JAX_VERSION" ]] || die "no 'jax==VERSION' line in $REPO/requirements.txt"

TARGET=("$NAME" "--zone=$ZONE_")
[[ -z "$PROJECT_" ]] || TARGET+=("--project=$PROJECT_")

# One command on every worker, through the remote login shell.
on_all() {
  echo "+ [all workers] $1" >&2
  "$GCLOUD_" compute tpus tpu-vm ssh "${TARGET[@]}" --worker=all --command="$1"
}

# The stop of step 1. The patterns never match the shell running them ("[.]" is not a literal ".").
PATTERN='python.* -m sod_jax[.](train|sft|eval|generate)( |$)'
STOP_CMD="pkill -TERM -f '$PATTERN' || true; \
for _ in \$(seq $STOP_GRACE); do pgrep -f '$PATTERN' >/dev/null || break; sleep 1; done; \
pkill -KILL -f '$PATTERN' || true; \
rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo -n rm -f /tmp/libtpu_lockfile || true"

if ((STOP_ONLY)); then
  on_all "$STOP_CMD"
  exit 0
fi

# 1. stop stale jobs, free the TPU
on_all "$STOP_CMD"

# 2. sync the code: a clean copy staged here, copied to a fresh directory on each worker, then
#    over REMOTE_DIR (so run directories under REMOTE_DIR are kept).
SYNC_TMP=".sod_jax_sync"
if ((SYNC)); then
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' EXIT
  tar -C "$REPO" --exclude=.git --exclude=runs --exclude=__pycache__ --exclude=.venv --exclude='*.egg-info' \
    --exclude=.pytest_cache --exclude=launch_logs -cf - . | tar -C "$stage" -xf -
  on_all "rm -rf $SYNC_TMP"
  echo "+ [all workers] copy $REPO -> $REMOTE_DIR_" >&2
  "$GCLOUD_" compute tpus tpu-vm scp --recurse "$stage" "$NAME:$SYNC_TMP" "--zone=$ZONE_" \
    ${PROJECT_:+"--project=$PROJECT_"} --worker=all
fi

q() { printf '%q' "$1"; }
RD="$(q "$REMOTE_DIR_")"

# 3. install the pinned runtime with the TPU build of the same jax
if ((SYNC || INSTALL)); then
  cmd="mkdir -p $RD"
  ((SYNC == 0)) || cmd+=" && cp -a $SYNC_TMP/. $RD/ && rm -rf $SYNC_TMP"
  ((INSTALL == 0)) || cmd+=" && cd $RD && $(q "$RPY") -m pip install -q -r requirements.txt $(q "jax[tpu]==$JAX_VERSION")"
  on_all "$cmd"
fi

# 4. start the job on every worker
job="$(q "$RPY") -m $(q "$MODULE_") --config $(q "$CONFIG")"
for arg in "$@"; do
  job+=" $(q "$arg")"
done
envs=""
for kv in "${JOB_ENV[@]}"; do
  envs+="$(q "$kv") "
done
if ((ATTACH)); then
  start="cd $RD && exec env ${envs}$job"
else
  start="cd $RD && mkdir -p launch_logs && log=launch_logs/\$(hostname).log && \
nohup env ${envs}$job >\"\$log\" 2>&1 </dev/null & pid=\$!; echo \$pid >launch_logs/job.pid; \
sleep $START_CHECK; if kill -0 \$pid 2>/dev/null; then echo \"started: pid \$pid, log $REMOTE_DIR_/\$log\"; \
else echo \"the job exited within ${START_CHECK}s:\"; tail -n 30 \"\$log\"; exit 1; fi"
fi

rc=0
on_all "$start" || rc=$?
if ((rc != 0)); then
  echo "tpu_vm.sh: the job failed on at least one worker (gcloud exit $rc): stopping it on every worker" >&2
  on_all "$STOP_CMD" || true
  exit "$rc"
fi
if ((ATTACH == 0)); then
  proj=""
  [[ -z "$PROJECT_" ]] || proj=" --project=$PROJECT_"
  cat >&2 <<EOF
Started on every worker of $NAME. Follow worker 0 (process 0 prints the progress):
  $GCLOUD_ compute tpus tpu-vm ssh $NAME --zone=$ZONE_$proj --worker=0 --command='tail -f $REMOTE_DIR_/launch_logs/*.log'
Stop (the training CLIs save a checkpoint on SIGTERM and exit 0; rerun this command to resume):
  launch/tpu_vm.sh --name $NAME --zone $ZONE_${PROJECT_:+ --project $PROJECT_} --stop
EOF
fi
