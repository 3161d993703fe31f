#!/usr/bin/env bash
# The test command: the whole suite on the bundled models (fetched into the user cache once).
# GPU tests skip without a CUDA device; llama.cpp oracle tests skip without llama-cpp-python.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -ra "$@"
