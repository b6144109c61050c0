# shellcheck shell=bash
# Sourced by .ci/demo (the README's first command) and .ci/run (its second):
# makes or reuses the project's virtual environment and installs keras_vit in
# it (editable) with the extras asked for. Only the `python3` of the system is
# needed: no pip install happens outside the virtual environment.
#
#   keras_vit_venv                         # keras_vit itself (enough for `keras-vit demo`)
#   keras_vit_venv "test,parity,bench"     # plus extras from setup.cfg
#
# PYTHON picks the interpreter (python3), KERAS_VIT_VENV the folder (.venv).
# A stamp in the venv remembers what was installed from which setup.cfg, so a
# second run installs nothing and needs no network.

keras_vit_venv() {
  local extras=${1:-}
  local python=${PYTHON:-python3}
  local venv=${KERAS_VIT_VENV:-.venv}
  local spec=.
  [ -n "$extras" ] && spec=".[$extras]"

  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating the virtual environment $venv (with $python)" >&2
    "$python" -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"

  local key
  key="$(pwd -P) $spec $(cat setup.cfg pyproject.toml | cksum)"
  if ! grep -qxF "$key" "$venv/.keras_vit-installed" 2>/dev/null; then
    echo "setup: installing keras_vit$([ -n "$extras" ] && echo " with [$extras]") into $venv (a few minutes the first time)" >&2
    python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q -e "$spec"
    echo "$key" >>"$venv/.keras_vit-installed"
  fi
}
