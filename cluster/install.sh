#!/usr/bin/env bash
# Install everything zooselect needs on a fresh Debian machine (idempotent).
# Every package is pinned to the version this project is tested with (cluster/constraints.txt,
# made on Python 3.11); pip takes torch from the local wheel cache where one exists, else from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
PY=${PYTHON:-python3}
# A distribution's own Python (Debian 12 and later, Ubuntu 23.04 and later) refuses pip installs
# (PEP 668): say how to go on instead of failing at the first pip with a page of text
# (PIP_BREAK_SYSTEM_PACKAGES=1 installs into it all the same, as pip itself allows).
managed=0
$PY -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(4 if sys.version_info < (3, 11) else 3 if managed and sys.prefix == sys.base_prefix else 0)' || managed=$?
if [ "$managed" = 4 ]; then  # the pins (cluster/constraints.txt: numpy, scipy, pandas) need 3.11
  echo "error: $($PY -c 'import sys; print(sys.executable, ".".join(map(str, sys.version_info[:3])))') is older than the" \
       "Python 3.11 the pinned versions need; set PYTHON to a Python >= 3.11" >&2
  exit 1
elif [ "$managed" = 3 ] && [ -z "${PIP_BREAK_SYSTEM_PACKAGES:-}" ]; then
  echo "error: $($PY -c 'import sys; print(sys.executable)') is managed by the system's package manager" \
       "(PEP 668), so pip may not install into it; install into a virtual environment and run this again" \
       "from it: ${SUDO:+$SUDO }apt-get install -y python3-venv && python3 -m venv ~/zooselect-venv" \
       "&& . ~/zooselect-venv/bin/activate && bash cluster/install.sh" >&2
  exit 1
elif [ "$managed" != 0 ] && [ "$managed" != 3 ]; then
  echo "error: cannot run Python as '$PY' (exit status $managed); set PYTHON to a Python >= 3.11" >&2
  exit 1
fi
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
# every package at the version tested (cluster/constraints.txt)
$PY -m pip install -q --disable-pip-version-check -c cluster/constraints.txt torch==2.14.1 torchvision==0.29.1
$PY -m pip install -q --disable-pip-version-check -c cluster/constraints.txt -e ".[test,models]"
# s3fs (through aiobotocore) pins a newer botocore than a machine's AWS CLI v1 may pin: the CLI moves
# to its release for that botocore, so that every installed package's requirements hold (pip check).
if $PY -m pip show awscli >/dev/null 2>&1; then
  BOTOCORE=$($PY -c 'import botocore; print(botocore.__version__)')
  $PY -m pip install -q --disable-pip-version-check awscli "botocore==$BOTOCORE"
fi
$PY -m pip check
echo "zooselect installed: $($PY -c 'import selection, torch, timm, ray; print("zooselect", selection.__version__, "torch", torch.__version__, "timm", timm.__version__, "ray", ray.__version__)')"
