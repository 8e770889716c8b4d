#!/usr/bin/env python3
"""The peer on pre-tokenized rows of varied length (`real_rows_side_by_side.sh`): PyTorch +
transformers + PEFT, bf16 base + bf16 LoRA on all 7 linears (the peer's best eager configuration in
`../shared/bench/peft_baseline/`), batches of --batch rows in file order, each right-padded to its
longest row (attention_mask 0, labels -100 there) as transformers' DataCollatorForSeq2Seq does,
AdamW at a constant --lr. Prints one JSON line: median tokens/s (non-pad tokens, steps after
--warmup), per-step times, peak RSS. (torch.compile is left out: every batch has its own shape.)
"""
import argparse
import json
import resource
import statistics
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--steps", type=int, default=12)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--grad-ckpt", action="store_true")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
model.config.use_cache = False
if a.grad_ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, lcfg, autocast_adapter_dtype=False)
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=a.lr)
rows = [json.loads(l) for l in open(a.data)]
model.train()
times, tokens, losses = [], [], []
for step in range(a.warmup + a.steps):
    batch = rows[step * a.batch:(step + 1) * a.batch]
    if len(batch) < a.batch:
        break
    s = max(len(r["input_ids"]) for r in batch)
    ids = torch.tensor([r["input_ids"] + [0] * (s - len(r["input_ids"])) for r in batch])
    labels = torch.tensor([r["labels"] + [-100] * (s - len(r["labels"])) for r in batch])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (s - len(r["input_ids"])) for r in batch])
    t0 = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    n = sum(len(r["input_ids"]) for r in batch)
    losses.append(float(loss.detach()))
    if step >= a.warmup:
        times.append(dt)
        tokens.append(n / dt)
print(json.dumps({
    "median_tok_s": statistics.median(tokens),
    "tok_s": [round(t, 1) for t in tokens],
    "step_s": [round(t, 3) for t in times],
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    "losses": [round(l, 4) for l in losses],
    "grad_ckpt": a.grad_ckpt,
}))
