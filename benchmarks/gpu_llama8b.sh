#!/usr/bin/env bash
# Training-step ratios to peft LoRA on a few decoder layers of Llama-3-8B's shapes (issue 28): hidden 4096, MLP
# 14336, 32 heads of which 8 key-value heads, vocabulary 128,256 (untied head), random weights, in float32 and bf16
# autocast, eager and compiled. SmolLM2-135M's ratios (benchmarks/gpu.sh) come from a 576-wide model whose
# adapters are a large share of each step; these are the ratios of the models users fine-tune on a GPU.
# Installs nothing (torch, transformers and peft where it runs). Writes llama8b.json to $OUT or runs/gpu, and
# stays within about 6 minutes on an H100 (each part has a time limit).
#
#   bash benchmarks/gpu_llama8b.sh            # on the GPU machine, from the repository root
#   PYTHON=.venv/bin/python bash benchmarks/gpu_llama8b.sh --quick   # the same plumbing on narrow shapes (CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh "$@"  # $out, $work, $python, $quick and `part`
model="$work/random-llama3-8b-slice"
layers=${LAYERS:-4}

# Llama-3-8B's configuration, `layers` decoder layers, random weights (saved in bf16: half the disk)
$python - "$model" "$quick" "$layers" <<'EOF' || exit 1
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from loramix.models import tiny_tokenizer
path, quick, layers = sys.argv[1], sys.argv[2] == "true", int(sys.argv[3])
shape = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=1024) if quick else dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                                  num_key_value_heads=8, head_dim=128, vocab_size=128256)
config = LlamaConfig(
    **shape, num_hidden_layers=layers, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds, not minutes
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(path)
tiny_tokenizer().save_pretrained(path)
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {layers} layers")
EOF

if $quick; then
  variants=topk,remix steps=1 limit=300 precisions=none shape="--batch 2 --length 32 --peak-size 256"
else  # every copy of the model is ~7.6 GB in float32: peft and four variants fit an 80 GB card
  variants=topk,remix,contrastive,task steps=4 limit=200 precisions=none,bf16 shape="--batch 4 --length 512"
fi
part train-eager "$limit" $python benchmarks/train_step.py --model "$model" --variants "$variants" \
  --autocast "$precisions" $shape --steps "$steps" --json "$work/parts/train-eager.json"
part train-compiled $((limit + 60)) $python benchmarks/train_step.py --model "$model" --variants topk \
  --autocast "${precisions##*,}" $shape --steps "$steps" --compile --json "$work/parts/train-compiled.json"

$python benchmarks/gpu_summary.py "$out/llama8b.json" "$work/parts"
