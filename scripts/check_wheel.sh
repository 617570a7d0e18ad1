#!/usr/bin/env bash
# The package as a user gets it: build the wheel from this checkout, install it into a fresh venv with only
# the core dependencies (torch==2.13.0 first, as `make setup` does), and run `secateur --help`,
# `secateur recipes` and the README's first Python snippet (quick settings of tests/_snippets.py) there.
# Also checks that no optional package (transformers, matplotlib, onnx, ...) came along.
#
#   scripts/check_wheel.sh            # or: make check-wheel
#   PYTHON=python3.11 TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu' scripts/check_wheel.sh
#   KEEP=1 scripts/check_wheel.sh     # keep the work folder (printed) for a look
set -euo pipefail
trap 'echo "check-wheel: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3.11}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}
PIPFLAGS=${PIPFLAGS:--qq}   # pip's warnings hidden (errors still shown): see the Makefile
WORK=$(mktemp -d "${TMPDIR:-/tmp}/secateur-wheel.XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
step() { echo "[check-wheel $(($(date +%s) - start))s] $*"; }

step "copying the project (tracked and new files, not ignored ones) to $WORK/src"
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard -- pyproject.toml README.md LICENSE src \
  | xargs -0 -I{} cp --parents {} "$WORK/src/"

step "building the wheel"
"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip"
$PIP install $PIPFLAGS --upgrade pip
$PIP wheel $PIPFLAGS --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/secateur-*.whl)
step "built $(basename "$WHEEL")"

step "installing torch==2.13.0, then the wheel with its core dependencies"
# shellcheck disable=SC2086
$PIP install $PIPFLAGS torch==2.13.0 $TORCH_PIP_ARGS
$PIP install $PIPFLAGS "$WHEEL"
extra=$($PIP list --format=freeze 2>/dev/null | grep -iE '^(transformers|accelerate|matplotlib|onnx|onnxruntime|onnxscript|torch-pruning|lightning|torchvision|timm|pillow|scipy)==' || true)
if [ -n "$extra" ]; then
  echo "error: optional packages installed with the core wheel:" >&2; echo "$extra" >&2; exit 1
fi

cd "$WORK"   # away from the checkout: secateur must come from the wheel
BIN="$WORK/venv/bin"
step "secateur --help"
"$BIN/secateur" --help >/dev/null
step "secateur recipes"
"$BIN/secateur" recipes > recipes.txt
grep wanda_2_4 recipes.txt > /dev/null || { echo "error: secateur recipes does not list wanda_2_4" >&2; exit 1; }
where=$("$BIN/python" -c 'import secateur, pathlib; print(pathlib.Path(secateur.__file__).parent)')
case "$where" in "$WORK/venv/"*) ;; *) echo "error: secateur imported from $where, not the wheel" >&2; exit 1;; esac
test -f "$where/py.typed"
step "the README's first Python snippet (quick settings)"
python3 "$ROOT/tests/_snippets.py" "$ROOT/README.md" 0 --quick > first_snippet.py
OMP_NUM_THREADS=1 "$BIN/python" first_snippet.py
step "ok: the wheel works with the core dependencies alone"
