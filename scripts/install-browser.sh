#!/usr/bin/env bash
# Installs what the browser test needs, outside the repository: Debian's Chromium (apt) and
# Playwright's Python package in a virtual environment that drives it (Playwright's own
# browser download cannot work without internet; it is pointed at Debian's binary instead).
# Prints the virtual environment's python.
set -euo pipefail
venv="${DUET_BROWSER_VENV:-$HOME/.cache/duet/browser-venv}"
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian's chromium..." >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >&2
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import playwright" 2>/dev/null; then
  echo "installing playwright into $venv..." >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet "playwright==1.65.2" >&2
fi
echo "$venv/bin/python"
