"""Run under torchrun (or alone): one LoRA backward on a fixed global batch; rank 0 saves the
gradients to argv[1]. Used by test_distributed.py to compare 1 and 2 processes."""

import sys

import torch
from transformers import set_seed

import variants
from training import distributed
from training.data import make_loader
from training.experiment import set_dropout
from training.models import load_model
from training.smoke_task import generate

context = distributed.context_from_env()
set_seed(0)
model, tokenizer = load_model("minilm", 2)
set_dropout(model, 0.0)
variants.inject_adapters(model, "lora", ["query", "value"], rank=8, alpha=16, exclude=["classifier"])
variants.mark_trainable(model, train_modules=["classifier"])
with torch.no_grad():  # nonzero B, so A gets gradients too
    for _, layer in variants.adapter_layers(model):
        layer.lora_B.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
train, _ = generate(64, 8)
loader = make_loader(train, tokenizer, ["sentence"], 16, 8, shuffle=True, seed=0, shard=context)
batch = next(iter(loader))
forward = torch.nn.parallel.DistributedDataParallel(model) if context.enabled else model
forward.train()
forward(**batch).loss.backward()
if context.is_main:
    torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, sys.argv[1])
if context.enabled:
    torch.distributed.destroy_process_group()
