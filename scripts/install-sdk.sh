#!/usr/bin/env bash
# Installs what the official-SDK test needs, outside the repository: OpenAI's Python SDK and
# Pydantic in a virtual environment. Prints the virtual environment's python.
set -euo pipefail
venv="${DUET_SDK_VENV:-$HOME/.cache/duet/sdk-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai, pydantic" 2>/dev/null; then
  echo "installing the openai SDK into $venv..." >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet "openai==3.57.0" "pydantic==2.14.4" >&2
fi
echo "$venv/bin/python"
