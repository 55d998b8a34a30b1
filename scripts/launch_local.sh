#!/usr/bin/env bash
# Launches N local processes of `epi-jax train` that form one multi-host run
# (jax.distributed with CPU collectives), e.g. 2 processes x 4 CPU devices:
#
#   scripts/launch_local.sh 2 4 --config configs/tiny.py --workdir /tmp/mh \
#       --config.data.seq_len=128
#
# Usage: launch_local.sh NUM_PROCESSES DEVICES_PER_PROCESS [epi-jax train args...]
# Env: PYTHON (default: .venv/bin/python if present, else python3), PORT (the
# coordinator's port; default: a free one), HEARTBEAT_TIMEOUT_S (default 30),
# LOG_DIR (default: WORKDIR/logs). Process 0's output goes to the terminal,
# every process's to LOG_DIR/process_I.log. Exits with the first non-zero
# status of any process (they all stop when one fails).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
n=$1; devices=$2; shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
port=${PORT:-$("$py" -c 'import portpicker; print(portpicker.pick_unused_port())')}
workdir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --workdir=*) workdir="${args[$i]#--workdir=}" ;;
    --workdir) workdir="${args[$((i + 1))]:-}" ;;
  esac
done
logs=${LOG_DIR:-${workdir:-.}/logs}
mkdir -p "$logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < n; i++)); do
  env JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "$py" -m epi_jax.cli train "$@" --coordinator_address "localhost:$port" \
      --num_processes "$n" --process_id "$i" \
      --heartbeat_timeout_s "${HEARTBEAT_TIMEOUT_S:-30}" > "$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$logs/process_0.log" --pid "${pids[0]}" &
status=0
for ((i = 0; i < n; i++)); do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "[launch_local] process $i exited with status $rc (log: $logs/process_$i.log)" >&2
    [[ $status -eq 0 ]] && status=$rc
  fi
done
wait || true
exit $status
