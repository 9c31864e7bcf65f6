#!/usr/bin/env bash
# Browser check of the notebook widgets (outside CI: needs Voila, chromium and playwright-core).
#   bash tests/browser/run_browser_check.sh            # writes docs/widgets_panel.png
# Installs what is missing: voila (pip, with the repo's torch constraint), Debian chromium (apt-get),
# playwright-core (npm, into ~/.cache/domerge-browser, outside the repo). Everything stays on
# 127.0.0.1; no browser is downloaded (playwright-core drives the system chromium).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PORT="${PORT:-8866}"
OUT="${OUT:-$ROOT/docs/widgets_panel.png}"
NODE_DIR="${DOMERGE_BROWSER_DIR:-$HOME/.cache/domerge-browser}"

"$PY" -c "import voila" 2>/dev/null || "$PY" -m pip install -q voila -c "$ROOT/constraints.txt"
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
if [ ! -d "$NODE_DIR/node_modules/playwright-core" ]; then
  mkdir -p "$NODE_DIR" && (cd "$NODE_DIR" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install --silent playwright-core@1)
fi

LOG="$(mktemp /tmp/domerge_voila.XXXX.log)"
cd "$ROOT/examples"
OMP_NUM_THREADS=1 "$PY" -m voila merge_in_notebook.ipynb --no-browser --port="$PORT" --Voila.ip=127.0.0.1 \
  --VoilaConfiguration.show_tracebacks=True >"$LOG" 2>&1 &
VOILA_PID=$!
trap 'kill "$VOILA_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break
  sleep 1
done
mkdir -p "$(dirname "$OUT")"
DOMERGE_BROWSER_DIR="$NODE_DIR" \
  node "$ROOT/tests/browser/panel_check.mjs" "http://127.0.0.1:$PORT/" "$OUT" || { echo "voila log: $LOG"; tail -30 "$LOG"; exit 1; }
echo "ok: $OUT"
