#!/usr/bin/env bash
# Prepares, in this checkout, what bench/gpu_check.py needs on a lent GPU machine (README, "Serving
# on a GPU"): the Python wheels its image lacks (.whl/) and the shared test data in three parts
# (.gpu_data/1, 2, 3), since one device call carries at most 64 MiB and SmolLM2 alone is 94 MiB.
# Both folders are git-ignored (.git/info/exclude). Then, back to back (a machine idle for 30 s is
# given back), three device calls:
#   carry [".gpu_data/1"]:          mkdir -p /root/lumen-data && cp -r .gpu_data/1/. /root/lumen-data/
#   carry [".gpu_data/2"]:          cp -r .gpu_data/2/. /root/lumen-data/
#   carry [".gpu_data/3", ".whl"]:  bash bench/gpu_stage.sh --run     (timeout_s 540)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=/root/lumen-data
SMOL=SmolLM2-135M-Instruct

if [[ "${1:-}" == "--run" ]]; then   # on the device, after the first two calls
    cp -r .gpu_data/3/. "$DATA/"
    cat "$DATA"/smol.part.* > "$DATA/models/$SMOL.Q4_1.gguf"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    exec python3 bench/gpu_check.py --data "$DATA" --out "${OUT:-/tmp/gpu_check}"
fi

SRC=${LUMEN_SHARED_DATA:-../shared/data}
for ignored in /.whl/ /.gpu_data/; do
    grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
rm -rf .whl .gpu_data
mkdir -p .whl .gpu_data/1 .gpu_data/2/models .gpu_data/3/models .gpu_data/3/quant
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl gguf==0.19.0 opentelemetry-api==1.45.2 importlib-metadata==8.7.0
split -b 50M "$SRC/models/$SMOL.Q4_1.gguf" .gpu_data/1/smol.part.
mv .gpu_data/1/smol.part.ab .gpu_data/2/
cp "$SRC/models/$SMOL.capital.ref64.logits.npy" .gpu_data/2/models/
cp "$SRC"/models/stories260K.gguf "$SRC"/models/stories260K.greedy200.* "$SRC"/models/$SMOL.*.ids \
   "$SRC/models/$SMOL.story.ref64.logits.npy" .gpu_data/3/models/
for name in stories260K-Q4_0 stories260K-Q8_0 synth256-Q4_K_M synth256-Q6_K synth256-Q5_K_M synth256-Q8_0 \
            synth256-Q4_1 synth256-IQ4_XS synth256-F16; do
    cp "$SRC/quant/$name.gguf" "$SRC/quant/$name.gguf.ref64.logits.npy" .gpu_data/3/quant/
done
du -sh .whl .gpu_data/*
