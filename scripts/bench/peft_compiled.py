#!/usr/bin/env python3
"""The PyTorch + PEFT baseline (../shared/bench/peft_baseline/bench_lora.py, same flags) with the
PEFT model under torch.compile (inductor, default mode): a configuration of the peer that eager
mode does not show. Its first step includes the compilation (minutes); the baseline's median
leaves out the warm-up steps, so the tokens/s are the compiled steady state.

  PEER=../shared/bench/peft_baseline python scripts/bench/peft_compiled.py --variant bf16 --adapter-dtype bf16 ...
"""
import os
import sys

import peft
import torch

sys.path.insert(0, os.environ.get("PEER", os.path.join(os.path.dirname(__file__), "../../../shared/bench/peft_baseline")))

_get_peft_model = peft.get_peft_model


def compiled_peft_model(*args, **kwargs):
    return torch.compile(_get_peft_model(*args, **kwargs))


# bench_lora imports get_peft_model from peft inside main(), after this
peft.get_peft_model = compiled_peft_model

import bench_lora  # noqa: E402

bench_lora.main()
