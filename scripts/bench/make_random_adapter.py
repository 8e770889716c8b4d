#!/usr/bin/env python3
"""A random PEFT LoRA adapter (r, alpha, all 7 Llama linears) for a model folder's config.json,
for merge/export benchmarks. Needs numpy and safetensors.
  python scripts/bench/make_random_adapter.py <model-dir> <out-dir> [rank]"""
import json, os, sys
import numpy as np
from safetensors.numpy import save_file

model, out = sys.argv[1], sys.argv[2]
r = int(sys.argv[3]) if len(sys.argv) > 3 else 16
c = json.load(open(os.path.join(model, "config.json")))
h, inter, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
hd = c.get("head_dim") or h // c["num_attention_heads"]
q, kv = c["num_attention_heads"] * hd, c.get("num_key_value_heads", c["num_attention_heads"]) * hd
shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
          "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
rng = np.random.default_rng(0)
t = {}
for l in range(L):
    for m, (o, i) in shapes.items():
        k = f"base_model.model.model.layers.{l}.{'mlp' if m in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{m}"
        t[k + ".lora_A.weight"] = (rng.standard_normal((r, i)) * 0.01).astype(np.float32)
        t[k + ".lora_B.weight"] = (rng.standard_normal((o, r)) * 0.01).astype(np.float32)
os.makedirs(out, exist_ok=True)
save_file(t, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "bias": "none",
           "target_modules": list(shapes), "task_type": "CAUSAL_LM", "use_rslora": False,
           "base_model_name_or_path": os.path.abspath(model)}, open(os.path.join(out, "adapter_config.json"), "w"), indent=2)
print(f"{out}: {len(t)} tensors, r={r}")
