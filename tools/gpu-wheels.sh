#!/usr/bin/env bash
# Wheels the GPU host lacks (it has torch, transformers, tokenizers, typer, rich, yaml, jinja2, safetensors, but no
# pydantic and no package index), downloaded here for its Python 3.12 x86-64 into .whl/ (ignored by git), to travel
# with the working tree. There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
#   python3 -m inferneo_build.gpu_check "$OUT/check" --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
for req in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$req"
done
ls -l .whl
