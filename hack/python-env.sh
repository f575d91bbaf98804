#!/usr/bin/env bash
# The virtual environment the Python agent (tests/python/agent.py) runs in: _output/python, with the pinned
# packages of tests/python/requirements.txt. Made once; made again when the requirements change.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ENV=$ROOT/_output/python
REQ=$ROOT/tests/python/requirements.txt
STAMP=$ENV/.requirements
if [ -x "$ENV/bin/python" ] && cmp -s "$REQ" "$STAMP"; then
  exit 0
fi
rm -rf "$ENV"
python3 -m venv "$ENV"
"$ENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
cp "$REQ" "$STAMP"
echo "python-env: $ENV: $(grep -v '^#' "$REQ" | tr '\n' ' ')" >&2
