#!/usr/bin/env bash
# Download (here, with PyPI access) the wheels the lent GPU machine lacks into .whl/ (git-ignored; carry it).
# That machine has torch 2.11 (CUDA, with triton), transformers 5.17, peft, accelerate, tiktoken, pyarrow, pandas; no
# deepspeed, datasets, trl, hjson, pydantic or liger-kernel. deepspeed ships only an sdist, so its wheel is built here (pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python -m pip download -q --no-deps "${platform[@]}" -d .whl \
    transformers==5.24.0 trl==1.16.0 "regex==$(python -c 'import importlib.metadata as m; print(m.version("regex"))')" \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions liger-kernel==0.8.5
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
