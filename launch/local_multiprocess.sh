#!/usr/bin/env bash
# N local processes of one `jaxalign train` job, joined over loopback.
#
#   launch/local_multiprocess.sh N [train args...]
#   e.g. launch/local_multiprocess.sh 2 --config configs/dpo_toy.py --workdir runs/mp
#
# Each process gets its own fake CPU devices (DEVICES_PER_PROCESS, default 4)
# and joins the coordinator at 127.0.0.1:PORT (PORT: a free port unless set);
# cross-process collectives run over gloo. Process i logs to
# ${LOG_DIR:-/tmp}/jaxalign_local_<port>_<i>.log as well as its own stdout
# prefix. The script exits with the first non-zero status of any process.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N [jaxalign train args...]" >&2
  exit 2
fi
N=$1; shift
PYTHON=${PYTHON:-python}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-/tmp}
mkdir -p "$LOG_DIR"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  log="$LOG_DIR/jaxalign_local_${PORT}_${i}.log"
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
    "$PYTHON" -m jaxalign.cli train "$@" \
      --coordinator "127.0.0.1:${PORT}" --num_processes "$N" --process_id "$i" \
      > >(sed -u "s/^/[$i] /" | tee "$log") 2>&1 &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    cleanup   # one failed: the others would wait on it until their timeout
  fi
done
exit $status
