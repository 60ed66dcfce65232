#!/usr/bin/env bash
# Runs one `jaxalign train` job on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/runs/NAME [train args...]
#   e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a gs://my-bucket/runs/llama3_8b_dpo \
#          --config configs/llama3_8b_dpo.py --config.init_from=gs://my-bucket/llama3.1-8b
#
# Every worker runs the same command (`gcloud compute tpus tpu-vm ssh
# --worker=all`); `--distributed` makes each call jax.distributed.initialize(),
# which finds the coordinator, the process count and its own id from the TPU
# metadata. The workdir must be on GCS so all workers share it (checkpoints,
# metrics, reference log-probs); install the gcs extra on the workers for it.
#
# Environment (optional):
#   PROJECT        gcloud project (default: gcloud's configured one)
#   REPO_DIR       checkout of jaxalign on every worker (default ~/jaxalign)
#   VENV           virtualenv on every worker (default ~/venv)
#   SETUP=1        first pip install -e "$REPO_DIR[tpu,gcs]" (the checkout must
#                  already be on every worker) into $VENV on every worker
#   LOG_DIR        local directory for the per-worker logs (default ./tpu_logs/NAME)
#   EXTRA_ENV      extra "K=V K2=V2" exported on the workers before the command
#
# Each worker's output is written on that worker to /tmp/jaxalign_train.log and
# copied to gs://.../logs/worker_<i>.log when the command ends; locally, gcloud
# prefixes every line with the worker it came from, and the whole stream is
# also saved in $LOG_DIR/all_workers.log.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; WORKDIR=$3; shift 3
if [[ "$WORKDIR" != gs://* ]]; then
  echo "workdir must be a gs:// URL shared by all workers, got $WORKDIR" >&2
  exit 2
fi
REPO_DIR=${REPO_DIR:-'~/jaxalign'}
VENV=${VENV:-'~/venv'}
LOG_DIR=${LOG_DIR:-./tpu_logs/$TPU_NAME}
mkdir -p "$LOG_DIR"
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}

if [[ "${SETUP:-0}" == 1 ]]; then
  ssh_all "python3 -m venv $VENV && $VENV/bin/pip install -q -e '$REPO_DIR[tpu,gcs]'"
fi

# Quote the train arguments once for the remote shell.
ARGS=$(printf ' %q' "$@")
REMOTE="set -o pipefail; cd $REPO_DIR && export ${EXTRA_ENV:-JAXALIGN_LAUNCHER=tpu_pod} \
TF_CPP_MIN_LOG_LEVEL=1 && \
W=\$(curl -s -H Metadata-Flavor:Google \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
  || echo \$HOSTNAME) && \
$VENV/bin/python -m jaxalign.cli train --distributed --noprogress --workdir $WORKDIR$ARGS \
  2>&1 | tee /tmp/jaxalign_train.log; rc=\$?; \
$VENV/bin/python -c \"import sys; from etils import epath; \
epath.Path(sys.argv[2]).write_bytes(open(sys.argv[1], 'rb').read())\" \
  /tmp/jaxalign_train.log $WORKDIR/logs/worker_\$W.log || true; exit \$rc"

ssh_all "$REMOTE" 2>&1 | tee "$LOG_DIR/all_workers.log"
