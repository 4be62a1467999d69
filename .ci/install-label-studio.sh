#!/usr/bin/env bash
# Label Studio for tests/test_labelstudio_live.py, in its own virtual environment (it pins Django and much else),
# cached between CI runs:
#   ${FEDAL_LS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fedal-ci/ls-venv}
# built with `python3 -m venv` from .ci/label-studio-requirements.txt (every package pinned) and reused while the
# stamp in it matches that file and its label-studio is the pinned version; otherwise it is built again.
# Prints the path of its `label-studio` executable on stdout (everything else goes to stderr):
#   FEDAL_LABEL_STUDIO="$(bash .ci/install-label-studio.sh)" && export FEDAL_LABEL_STUDIO
# First build: about 1 minute and 1 GB (2 cores, PyPI reachable); reuse: well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

LS_VERSION=1.23.2
REQUIREMENTS=.ci/label-studio-requirements.txt
VENV="${FEDAL_LS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fedal-ci/ls-venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.fedal-ls-requirements"

installed_version() {
  "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null || true
}

if [[ -x "$VENV/bin/label-studio" && -f "$STAMP" ]] && cmp -s "$STAMP" "$REQUIREMENTS" \
   && [[ "$(installed_version)" == "$LS_VERSION" ]]; then
  echo "Label Studio $LS_VERSION: reusing $VENV" >&2
else
  echo "Label Studio $LS_VERSION: building $VENV" >&2
  start=$SECONDS
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS" >&2
  got="$(installed_version)"
  if [[ "$got" != "$LS_VERSION" ]]; then
    echo "Label Studio: $REQUIREMENTS installed label-studio '$got', not $LS_VERSION" >&2
    exit 1
  fi
  cp "$REQUIREMENTS" "$STAMP"  # last: an interrupted build is not reused
  echo "Label Studio $LS_VERSION: built in $((SECONDS - start)) s" >&2
fi
echo "$VENV/bin/label-studio"
