#!/usr/bin/env python3
"""The peer of `qlora train --device cuda`: the usual QLoRA recipe on one GPU.

PyTorch + transformers + PEFT + bitsandbytes (0.50.2): NF4 + double quant,
bf16 compute, LoRA r 16 / alpha 32 on all 7 linears (dropout 0), AdamW
(torch, lr 1e-4), gradient checkpointing (use_reentrant=False), sdpa
attention. One fixed random batch; tokens/s = median over the timed steps
after warm-up; peak memory = torch.cuda.max_memory_allocated (and reserved).
Writes one JSON object (--json-out).
"""
import argparse
import json
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json-out", required=True)
    a = ap.parse_args()

    import bitsandbytes as bnb
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    t0 = time.perf_counter()
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, quantization_config=qcfg,
                                                 dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    load_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g).cuda()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        losses.append(out.loss.item())
        if i >= a.warmup:
            times.append(dt)
    tok = a.batch * a.seq
    res = dict(
        who="peft+bnb", model_dir=a.model_dir, batch=a.batch, seq=a.seq,
        tokens_per_s_median=tok / statistics.median(times), step_s=times, losses=losses,
        peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
        load_s=load_s, trainable=sum(p.numel() for p in trainable),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                      bitsandbytes=bnb.__version__, cuda=torch.version.cuda),
        gpu=torch.cuda.get_device_name(0),
    )
    with open(a.json_out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res[k] for k in ("tokens_per_s_median", "peak_alloc_gib", "peak_reserved_gib")}))


if __name__ == "__main__":
    main()
