#!/usr/bin/env bash
# Regenerates the locks (pip constraints files pinning the whole dependency tree) from setup.cfg's bounds with
# uv's resolver (`pip install uv` first): `bash requirements/compile.sh`, then rerun the tests and commit the
# locks together. They are resolved for CI's platform, Linux x86-64 with Python 3.11; as constraints files they
# also install elsewhere (a package a platform does not need is simply not installed).
#   requirements/cpu.lock     the CPU install with every extra but the CUDA ones (what CI and README install)
#   requirements/cuda12.lock  the same with JAX's CUDA 12 wheels, requirements/cuda13.lock with CUDA 13
# `bash requirements/compile.sh --lowest <file>` writes instead the oldest versions setup.cfg allows
# (uv's lowest-direct resolution), to check the lower bounds: install that file in a fresh venv and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=(python -m uv)
command -v uv >/dev/null && uv=(uv)
# torch's CPU build that this project's machines install from a local file (pip install torch==2.13.0).
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_31 --no-header --quiet -c "$constraints")
if [ "${1:-}" = "--lowest" ]; then
  "${uv[@]}" pip compile pyproject.toml --extra test "${common[@]}" --resolution lowest-direct -o "${2:?output file}"
  exit 0
fi
cpu_extras=(--extra test --extra torch --extra tpu --extra onnx)
"${uv[@]}" pip compile pyproject.toml "${cpu_extras[@]}" "${common[@]}" -o requirements/cpu.lock
for cuda in cuda12 cuda13; do
  "${uv[@]}" pip compile pyproject.toml --extra test --extra "$cuda" "${common[@]}" -o "requirements/$cuda.lock"
done
