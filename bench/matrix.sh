#!/usr/bin/env bash
# The full benchmark matrix, one command after another on a quiet machine (about 85 min on 2 cores).
# Every result lands in bench/results/ with its command; charts are drawn at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# Greedy HumanEval, same target hardware: SSD against AR, SD and HF assisted generation.
$PY -m bench.run_bench --name humaneval-greedy-16x128 --num-prompts 16 --max-tokens 128 --modes ar,sd,ssd,hf --interleave
# T = 0.7: coupled SSD against the rejection test with Saguaro sampling factors C.
$PY -m bench.run_bench --name humaneval-t0.7-saguaro-c --num-prompts 8 --max-tokens 64 --temperature 0.7 \
    --modes ar,sd,ssd,ssd-c1,ssd-c0.7,ssd-c0.5,ssd-c0.3
# Fan-out rules and budgets at T = 0.7.
$PY -m bench.fanout_bench --name fanout-t0.7-budgets --temperature 0.7 --num-prompts 8 --max-tokens 64 \
    --budgets 4,8,16 --policies uniform,geometric,adaptive
# Continuous batching.
$PY -m bench.concurrency --name concurrency-humaneval --num-prompts 8 --max-tokens 64 --levels 1,4,8 --modes ar,sd,ssd
# Same total hardware: AR, SD and HF assisted may use both cores.
$PY -m bench.run_bench --name humaneval-greedy-8x64-same-total --num-prompts 8 --max-tokens 64 --modes ar,sd,ssd,hf --hardware same-total
# Draft speed: the output layer admitting new tokens, the cache build by phase, and SD and SSD with a sub-vocabulary draft output layer.
$PY -m bench.draft_vocab_growth
$PY -m bench.draft_speed --name draft-speed-vocab --num-prompts 2 --steps 4 --variants int8,int8-v65536,int8-v32768
$PY -m bench.run_bench --name humaneval-greedy-8x64-vocab --num-prompts 8 --max-tokens 64 --modes sd,ssd,sd-v32768,ssd-v32768
# The cost of batch-invariant row attention in the target's decode forwards.
$PY -m bench.row_attention
# The row counts at which the target's linear layers round alike and the counts the verifier picks, also with every output feature probed and with the instruction sets capped.
$PY -m bench.row_classes
$PY -m bench.row_classes --name row-classes-full --max-features 0
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 $PY -m bench.row_classes --name row-classes-avx512bf16 --dtypes bfloat16
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $PY -m bench.row_classes --name row-classes-avx2 --dtypes float32
# Stalls of a running stream while a long prompt is prefilled, chunked and whole.
$PY -m bench.prefill_stall --name prefill-stall --chunks 256,4096
# Prose and maths.
$PY -m bench.run_bench --name gsm8k-greedy-8x64 --prompt-set gsm8k --num-prompts 8 --max-tokens 64 --modes ar,sd,ssd

for result in humaneval-greedy-16x128 humaneval-t0.7-saguaro-c concurrency-humaneval humaneval-greedy-8x64-same-total gsm8k-greedy-8x64; do
    $PY -m bench.plots "bench/results/$result.json"
done
