#!/bin/bash
# A multi-host training run on a Cloud TPU pod slice: the same command on every worker.
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a CONFIG=configs/demo.py WORKDIR=/mnt/shared/exp1 \
#     bash launch/tpu_pod.sh [--config.x=y ...]
# Every worker needs this repository at ~/vlretrieval with its .venv (`make install` there, with
# jax[tpu]), and the workdir on storage all workers see (a Filestore/NFS mount or GCS FUSE).
# JAX finds the other workers through the TPU metadata (VLRETRIEVAL_DISTRIBUTED=auto). A
# maintenance event sends SIGTERM: each worker saves and exits 143; run this script again to resume.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
: "${CONFIG:?set CONFIG=configs/<experiment>.py}" "${WORKDIR:?set WORKDIR to shared storage}"
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/vlretrieval && VLRETRIEVAL_DISTRIBUTED=auto .venv/bin/vlretrieval train --config $(printf %q "$CONFIG") --workdir $(printf %q "$WORKDIR")$EXTRA"
