#!/usr/bin/env bash
# Fashion-MNIST for the default params: Debian's `dataset-fashion-mnist` package where
# apt-get can install it. Elsewhere the prepare stage falls back to torchvision's download
# (data.download: true), so a failure here is only a warning.
set -uo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "get-fashion-mnist: no apt-get; prepare will use torchvision's download" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  sudo=""
elif sudo -n true 2>/dev/null; then
  sudo="sudo -n"
else
  echo "get-fashion-mnist: not root; run 'sudo apt-get install dataset-fashion-mnist'" \
    "or let prepare download it" >&2
  exit 0
fi
$sudo apt-get update -qq >/dev/null &&
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null ||
  echo "get-fashion-mnist: apt-get install failed; prepare will try torchvision's download" >&2
