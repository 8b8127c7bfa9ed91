"""torchrun script: a real ``transformers`` LlamaForCausalLM trained by DeepSpeed on CPU.

    torchrun --nproc_per_node N hf_llama_deepspeed.py OUT [--stage S] [--steps K]

Builds the Llama from a small config (GQA 6/2 heads, attention biases, vocabulary 1003,
untied head), trains it ``K`` AdamW steps under ZeRO-``S`` in fp32 on gloo, and writes:

* ``OUT/ckpt``: ``engine.save_checkpoint`` (DeepSpeed's own files, tag ``step{K}``);
* ``OUT/config``: the model's ``config.json`` (``save_pretrained`` of the config: DeepSpeed
  checkpoints carry none);
* ``OUT/trained.pt`` (rank 0): the trained weights as DeepSpeed's own
  ``get_fp32_state_dict_from_zero_checkpoint`` gathers them, and the logits of the trained
  model (its module after the last step, in eval mode) on a fixed input (saved with them).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

INPUT = torch.tensor([[1, 17, 1002, 5, 999, 64, 3, 512, 7, 11]])


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=1003, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, attention_bias=True,
                      tie_word_embeddings=False, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot go unnoticed
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    return cfg, model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, model = build()
    ds_cfg = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4,
              "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
              "zero_optimization": {"stage": a.stage}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
    for step in range(a.steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.randint(0, cfg.vocab_size, (4, 17), generator=g)
        logits = engine(ids[:, :-1]).logits
        engine.backward(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
        engine.step()
    engine.save_checkpoint(os.path.join(a.out, "ckpt"), tag=f"step{a.steps}")
    dist.barrier()
    if rank == 0:
        cfg.save_pretrained(os.path.join(a.out, "config"))
        weights = get_fp32_state_dict_from_zero_checkpoint(os.path.join(a.out, "ckpt"))
        engine.module.eval()
        with torch.no_grad():
            logits = engine.module(INPUT).logits
        torch.save({"weights": {k: v.clone() for k, v in weights.items()}, "logits": logits, "input": INPUT},
                   os.path.join(a.out, "trained.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
