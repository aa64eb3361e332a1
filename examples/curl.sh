#!/usr/bin/env bash
# The OpenAI HTTP API of `pdserve serve` with curl (default http://127.0.0.1:8000).
# Usage: examples/curl.sh [BASE_URL]    (export PDSERVE_API_KEY=... if the server needs a key)
set -euo pipefail
BASE=${1:-http://127.0.0.1:8000}
AUTH=()
if [[ -n "${PDSERVE_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer ${PDSERVE_API_KEY}"); fi

echo "== health";  curl -sS "$BASE/health"; echo
echo "== models";  curl -sS "${AUTH[@]}" "$BASE/v1/models"; echo

echo "== chat (non-streaming)"
curl -sS "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 32, "temperature": 0}'
echo

echo "== completion (streaming, with a usage chunk; 30 s deadline)"
curl -sSN "${AUTH[@]}" "$BASE/v1/completions" -H 'Content-Type: application/json' \
  -H 'x-pdserve-timeout-s: 30' -d '{
  "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0,
  "stream": true, "stream_options": {"include_usage": true}}'

echo "== a bad request (400 with a JSON error)"
curl -sS "${AUTH[@]}" "$BASE/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "hi", "temperature": -1}'
echo
