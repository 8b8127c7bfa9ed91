"""torchrun script: train a tiny Llama-shaped model with real DeepSpeed ZeRO on CPU (gloo), save
a checkpoint and dump DeepSpeed's own gathered answers (fp32 params, Adam states, step) as
reference files for the tests; or resume from a checkpoint and record the next losses.

Usage (every rank):
  torchrun --nproc_per_node N ds_train.py --out DIR --stage S --dtype fp32|bf16|fp16
           [--steps K] [--tied] [--frozen] [--sub-group-size M]
           [--load DIR [--universal]] [--more K] [--ref FILE] [--losses FILE] [--second-save K]

Model: 2 blocks, hidden 72, 6 heads / 2 kv heads (GQA), SwiGLU 136, biases on q/k/v and the
MLP, vocabulary 1003; two AdamW param groups (ndim >= 2 with weight decay, the rest without).
``--frozen`` freezes layer 0's layernorms and k_proj; ``--tied`` ties lm_head to the embedding.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ucp.demo_model import TinyConfig, TinyLlama  # noqa: E402

CONFIG = dict(vocab_size=1003, hidden_size=72, intermediate_size=136, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2)


def build_model(tied: bool, frozen: bool) -> nn.Module:
    torch.manual_seed(1234)
    c = TinyConfig(**CONFIG, tie_word_embeddings=tied)
    m = TinyLlama(c)
    for blk in m.model.layers:  # biases on q/k/v and the MLP projections (awkward 1-D shapes)
        a, p = blk.self_attn, blk.mlp
        a.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=True)
        a.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=True)
        a.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=True)
        p.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=True)
        p.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=True)
    if frozen:
        blk = m.model.layers[0]
        for p in [blk.input_layernorm.weight, blk.post_attention_layernorm.weight,
                  blk.self_attn.k_proj.weight, blk.self_attn.k_proj.bias]:
            p.requires_grad_(False)
    return m


def param_groups(model: nn.Module):
    ps = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in ps if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for n, p in ps if p.ndim < 2], "weight_decay": 0.0, "lr": 2e-3}]


def ds_config(args, world):
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
           "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1, "torch_adam": True}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-3,
                                                          "warmup_num_steps": 10}},
           "zero_optimization": {"stage": args.stage},
           "gradient_clipping": 1.0, "wall_clock_breakdown": False}
    if args.stage == 3:
        cfg["zero_optimization"].update({"sub_group_size": args.sub_group_size,
                                         "stage3_param_persistence_threshold": 0})
    if args.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif args.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 100}
    if args.universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


GLOBAL_BATCH = 12  # divisible by 2, 3 and 4 ranks: every world size sees the same global batch


def batch(step, rank, world, vocab):
    """This rank's rows of the step's global batch (the same global batch at any world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (GLOBAL_BATCH, 17), generator=g)
    per = GLOBAL_BATCH // world
    return ids[rank * per:(rank + 1) * per]


def train(engine, start, n, rank):
    """``n`` steps from step ``start``; returns the global mean losses (every rank's averaged)."""
    import torch.distributed as dist

    losses, world = [], dist.get_world_size()
    for s in range(start, start + n):
        ids = batch(s, rank, world, CONFIG["vocab_size"])
        logits = engine(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def dump_reference(engine, model, path, rank):
    """DeepSpeed's own gather of every trainable parameter's fp32 master and Adam states, and the
    optimizer's step per param group (collective: every rank calls it, rank 0 saves)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    out = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for gi, g in enumerate(param_groups(model)):
        if hasattr(opt, "_hp_optimizer_states_linked"):  # ZeRO-1/2 link states lazily per group
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        for p in g["params"]:
            name = NAMES[id(p)]
            out["param"][name] = safe_get_full_fp32_param(p).clone()
            for st in ("exp_avg", "exp_avg_sq"):
                out[st][name] = safe_get_full_optimizer_state(p, st).clone()
    setter = getattr(opt, "_set_fp32_optimizer_param_groups", None)  # ZeRO-3 detaches them between steps
    if setter:
        setter()
    inner = opt.optimizer.state_dict()  # the torch optimizer DeepSpeed wraps, as the run holds it
    if setter:
        opt._clear_fp32_optimizer_param_groups()
    for gi, g in enumerate(inner["param_groups"]):
        out["step"][gi] = sorted({int(inner["state"][i]["step"]) for i in g["params"] if i in inner["state"]})
    if rank == 0:
        torch.save(out, path)


NAMES: dict[int, str] = {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--frozen", action="store_true")
    ap.add_argument("--sub-group-size", type=int, default=1000)
    ap.add_argument("--load")
    ap.add_argument("--universal", action="store_true")
    ap.add_argument("--more", type=int, default=0)
    ap.add_argument("--second-save", type=int, default=0, help="train K more steps and save a second tag")
    ap.add_argument("--config", help="JSON overrides of the model config (benchmarks)")
    ap.add_argument("--ref")
    ap.add_argument("--losses")
    args = ap.parse_args()

    import deepspeed
    import torch.distributed as dist

    if args.config:
        CONFIG.update(json.loads(args.config))
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.tied, args.frozen)
    NAMES.update({id(p): n for n, p in model.named_parameters()})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                           config=ds_config(args, world))
    losses = []
    if args.load:
        engine.load_checkpoint(args.load, load_optimizer_states=True, load_lr_scheduler_states=True)
        start = engine.global_steps
    else:
        start = 0
        losses += train(engine, 0, args.steps, rank)
        # universal_checkpoint_info: what ds_to_universal needs at ZeRO-1/2 (Megatron-DeepSpeed sets it)
        engine.save_checkpoint(args.out, client_state={"note": "ucp fixture", "epoch": 1,
                                                       "universal_checkpoint_info": {}})
    if args.ref:
        dump_reference(engine, model, args.ref, rank)
    if args.second_save:
        train(engine, args.steps, args.second_save, rank)
        engine.save_checkpoint(args.out, save_latest=False)
    if args.more:
        losses += train(engine, start + (0 if args.load else args.steps), args.more, rank)
    if args.losses and rank == 0:
        with open(args.losses, "w") as f:
            json.dump(losses, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
