#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.sh needs on a lent GPU machine that cannot reach a package
# index and has its own, older transformers: the project's transformers wheel (pure Python; its
# other requirements are on that image) and the gpt2 tokenizer of the tiny test models, under
# .gpu/ (git-ignored, ~17 MB). Run it here, then carry it:
#   bash benchmarks/gpu_prepare.sh
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/cache/tokenizers
version=$($PY -c "import transformers; print(transformers.__version__)")
$PY -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl "transformers==$version"
cache=$($PY -c "from ivl.models.tiny import tokenizer_dir; print(tokenizer_dir('gpt2'))")
cp -r "$cache" .gpu/cache/tokenizers/gpt2
du -sh .gpu
