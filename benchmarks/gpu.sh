#!/usr/bin/env bash
# Every router and peft LoRA on a GPU in one short call (issue 17): training steps eager and compiled, in
# float32 and bf16 autocast, batch-1 decoding (eager, and static-cache compiled: CUDA graphs), 8-tenant
# serving and the other methods, on random weights of SmolLM2-135M's shapes (speed does not depend on them).
# Installs nothing: it needs torch, transformers and peft where it runs (the device machine has them). Writes
# one JSON, gpu.json, to $OUT (the device tool's folder) or to runs/gpu; each part has a time limit so that the
# whole stays within about 8 minutes.
#
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh --quick   # the same plumbing, narrow model, few steps (CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh "$@"  # $out, $work, $python, $quick and `part`
model="$work/random-smollm2"

# SmolLM2-135M's configuration with random weights, and the tiny tokenizer (only its special ids are used)
$python - "$model" "$quick" <<'EOF' || exit 1
import sys
from transformers import LlamaConfig, LlamaForCausalLM
from loramix.models import tiny_tokenizer
path, quick = sys.argv[1], sys.argv[2] == "true"
config = LlamaConfig(
    vocab_size=49152, hidden_size=64 if quick else 576, intermediate_size=128 if quick else 1536,
    num_hidden_layers=30, num_attention_heads=9 if not quick else 4, num_key_value_heads=3 if not quick else 2,
    head_dim=64 if not quick else 16, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, bos_token_id=1, eos_token_id=2,
    pad_token_id=2,
)
LlamaForCausalLM(config).save_pretrained(path)
tiny_tokenizer().save_pretrained(path)
EOF

if $quick; then
  # a CPU check of the plumbing: small steps, no bf16 (emulated on many CPUs), inductor on one router only
  steps=1 rounds=1 tokens=4 limit=300 static=300 eager=topk compiled=topk precisions=none shape="--batch 2 --length 32 --peak-size 256"
else
  steps=4 rounds=3 tokens=32 limit=130 static=75 eager=all compiled=topk,soft,prompt precisions=none,bf16 shape=""
fi
part train-eager "$limit" $python benchmarks/train_step.py --model "$model" --variants "$eager" --autocast "$precisions" \
  $shape --steps "$steps" --json "$work/parts/train-eager.json"
part train-compiled $((limit + 30)) $python benchmarks/train_step.py --model "$model" --variants "$compiled" \
  --autocast "$precisions" $shape --steps "$steps" --compile --json "$work/parts/train-compiled.json"
part decode 40 $python benchmarks/decode.py --model "$model" --rounds "$rounds" --new-tokens "$tokens"
part decode-static "$static" $python benchmarks/decode.py --model "$model" --rounds "$rounds" --new-tokens "$tokens" \
  --variants prompt,prompt+static,task-merged,task-merged+static
part tenants 40 $python benchmarks/tenants.py --model "$model" --rounds "$rounds" --new-tokens "$tokens"
part methods 50 $python benchmarks/methods.py --model "$model" --rounds "$rounds" --new-tokens "$tokens"

# one JSON: the training results as their script wrote them, the other tables as printed
$python benchmarks/gpu_summary.py "$out/gpu.json" "$work/parts"
