#!/usr/bin/env python3
"""Random-init Llama-family checkpoints for the GPU benchmark (no download).

Same construction as ../shared/bench/peft_baseline/make_model.py (LlamaConfig +
LlamaForCausalLM + save_pretrained), with the Llama-3.1-8B shape added and the
weights created directly on the GPU in bf16 when one is there (an 8B model
initialised on the CPU in f32 would take minutes and 32 GB of RAM).

Sizes: smollm2-135m (tied), tinyllama-1.1b, llama-3.1-8b (untied, GQA 32/8,
vocab 128256, rope theta 500000; the llama3 rope scaling is left out: it
changes no FLOP and no byte).

Pinned peer stack of the benchmark: torch + transformers + peft on the GPU
machine, bitsandbytes 0.50.2 (carried by scripts/gpu_build.sh).
"""
import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}


def make_config(size: str) -> LlamaConfig:
    kw = dict(SIZES[size])
    theta = kw.pop("rope_theta")
    cfg = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
    cfg.use_cache = False
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.out, "config.json")):
        print(f"{a.out}: exists")
        return
    torch.manual_seed(a.seed)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = make_config(a.size)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True, max_shard_size="5GB")
    print(f"saved {a.size}: {n/1e9:.3f}B params ({a.dtype}) -> {a.out}")


if __name__ == "__main__":
    main()
