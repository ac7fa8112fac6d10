#!/bin/bash
# Pretraining (or any config.mode) on a multi-host Cloud TPU VM slice: the same command on every
# worker of the slice, over `gcloud compute tpus tpu-vm ssh --worker=all`:
#   python -m lemumo_jax.main --config=CONFIG --workdir=WORKDIR --distributed [FLAGS...]
#
# Usage:
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG[:ROW] WORKDIR [--config.key=value ...]
#   PROJECT=my-project launch/tpu_vm.sh my-v5p-32 us-east5-a configs/waymo.py:lemumo \
#       /mnt/shared/runs/waymo_lemumo --config.data.data_dir=/mnt/shared/waymo_shards
# Environment (all optional):
#   PROJECT    gcloud project (default: gcloud's configured one)
#   REPO_DIR   the repository on every worker (default: ~/lemumo_jax)
#   VENV       a virtual environment on every worker to activate (default: none)
#   LOG        run detached under nohup, each worker writing LOG.<hostname> (default: attached;
#              the run then ends if this ssh session drops)
#
# Before the first run, on every worker (--worker=all): clone the repository to REPO_DIR and
# install requirements.txt with `jax[tpu]==0.10.2` in place of jax. The data directory must be
# readable and WORKDIR writable from every worker under the same path (Filestore/NFS or a
# gcsfuse mount): checkpoints and the exported encoder go there, and rerunning the same
# command resumes from the latest checkpoint.
#
# `--distributed` calls jax.distributed.initialize() with no arguments; on a TPU VM JAX reads
# the coordinator (worker 0), the process count and this worker's id from the TPU metadata, and
# every process drives all TPU chips of its host. The global batch (config.train.batch_size)
# must be divisible by the slice's chip count; each worker reads a disjoint strided slice of
# the records.

set -euo pipefail

usage="usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG[:ROW] WORKDIR [--config.key=value ...]"
TPU_NAME=${1:?$usage}
ZONE=${2:?$usage}
CONFIG=${3:?$usage}
WORKDIR=${4:?$usage}
shift 4

REPO_DIR=${REPO_DIR:-'~/lemumo_jax'}   # expanded by the worker's shell
project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=(--project="${PROJECT}")
fi

# The remote command line; the arguments are quoted for the worker's shell.
run="python -m lemumo_jax.main --config=$(printf '%q' "${CONFIG}")"
run+=" --workdir=$(printf '%q' "${WORKDIR}") --distributed"
if (( $# )); then
  run+=$(printf ' %q' "$@")
fi
setup="cd ${REPO_DIR} && export TF_CPP_MIN_LOG_LEVEL=2"
if [[ -n "${VENV:-}" ]]; then
  setup+=" && source ${VENV}/bin/activate"
fi
if [[ -n "${LOG:-}" ]]; then
  run="nohup ${run} > ${LOG}.\$(hostname) 2>&1 < /dev/null &"
fi

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" \
  ${project_flag[@]+"${project_flag[@]}"} \
  --worker=all --command="${setup} && ${run}"
