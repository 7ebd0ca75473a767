#!/usr/bin/env bash
# Install everything zooselect needs on a fresh Debian machine (idempotent).
# Torch is pinned to the build this project is tested with; pip takes it from the local
# wheel cache where one exists, else from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
$PY -m pip install -q --disable-pip-version-check -e ".[test,models]"
# s3fs (through aiobotocore) pins a newer botocore than a machine's AWS CLI v1 may pin: the CLI moves
# to its release for that botocore, so that every installed package's requirements hold (pip check).
if $PY -m pip show awscli >/dev/null 2>&1; then
  BOTOCORE=$($PY -c 'import botocore; print(botocore.__version__)')
  $PY -m pip install -q --disable-pip-version-check awscli "botocore==$BOTOCORE"
fi
$PY -m pip check
echo "zooselect installed: $($PY -c 'import selection, torch, timm, ray; print("zooselect", selection.__version__, "torch", torch.__version__, "timm", timm.__version__, "ray", ray.__version__)')"
