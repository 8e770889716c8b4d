#!/usr/bin/env python3
"""Pre-tokenized chat-like rows for the real-data side by side (`real_rows_side_by_side.sh`).

Lengths and prompt masks follow a chat JSONL file (`{"messages": [...]}` per line, e.g. the demo's
`runs/chatterbot.jsonl`): each conversation's turns become ~chars/4 tokens plus 5 template tokens per
turn after --system masked tokens, the last assistant turn's tokens are the targets (the rest labelled -100), cut to --max-len.
Token ids are random below --vocab (seeded): the bench models are random too; what matters for
speed is the rows' lengths and masks, which both trainers read from the same file.
--rows conversations are taken evenly spaced through the file (its first ones are one topic's).
Writes `{"input_ids": [...], "labels": [...]}` per line.
"""
import argparse
import json
import random

ap = argparse.ArgumentParser()
ap.add_argument("chat_jsonl")
ap.add_argument("--out", required=True)
ap.add_argument("--vocab", type=int, default=49152)
ap.add_argument("--max-len", type=int, default=128)
ap.add_argument("--rows", type=int, default=400)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--system", type=int, default=0,
                help="masked tokens of a system prompt before each conversation (SmolLM2's default: ~20)")
a = ap.parse_args()
rng = random.Random(a.seed)
lines = open(a.chat_jsonl).read().splitlines()
every = max(1, len(lines) // a.rows)
n = 0
with open(a.out, "w") as out:
    for line in lines[::every]:
        msgs = json.loads(line)["messages"]
        turns = [a.system] + [max(1, len(m["content"]) // 4) + 5 for m in msgs]
        total = min(sum(turns), a.max_len)
        target_from = min(sum(turns[:-1]), total - 1)
        ids = [rng.randrange(a.vocab) for _ in range(total)]
        labels = [-100 if i < target_from else t for i, t in enumerate(ids)]
        out.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
        n += 1
        if n == a.rows:
            break
print(f"{n} rows -> {a.out}")
