#!/bin/bash
# lumen serve on SmolLM2-135M-Instruct, then 3 greedy 64-token Generates through `lumen generate`, decode tokens/s each
cd "$(dirname "$0")/.."
.venv/bin/lumen serve --model ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf --port 50090 --log-format text > /tmp/ab_serve.log 2>&1 &
pid=$!
until grep -q "serving" /tmp/ab_serve.log; do sleep 0.5; done
for i in 1 2 3; do .venv/bin/lumen generate "Once upon a time" --server 127.0.0.1:50090 --temperature 0 --max-tokens 64 --ignore-eos 2>&1 >/dev/null | grep -o "tokens/s=[0-9.]*"; done
kill $pid; wait $pid 2>/dev/null
