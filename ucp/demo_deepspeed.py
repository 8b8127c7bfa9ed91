"""``ucp demo``'s DeepSpeed chapter, and the DeepSpeed training worker it (and the tests) run.

The chapter (:func:`run_chapter`, when DeepSpeed is importable): train a tiny Llama-shaped
model with real DeepSpeed ZeRO-2 on 2 CPU ranks (gloo), ``ucp convert`` the save, ``ucp export``
it for 3 ranks at ZeRO-3, resume with DeepSpeed's own ``engine.load_checkpoint`` and check that
DeepSpeed's gather of the fp32 params and Adam states is bit-exact and the next loss equal.

The worker (``python -m torch.distributed.run ... -m ucp.demo_deepspeed [options]``, every rank):
train and save a checkpoint, dump DeepSpeed's own gathered answers (fp32 params, Adam states,
step) as a reference file, or resume from a checkpoint and record the next losses::

  --out DIR --stage S --dtype fp32|bf16|fp16 [--steps K] [--tied] [--frozen]
  [--sub-group-size M] [--load DIR [--universal]] [--more K] [--ref FILE] [--losses FILE]
  [--second-save K] [--config JSON]

Model: 2 blocks, hidden 72, 6 heads / 2 kv heads (GQA), SwiGLU 136, biases on q/k/v and the
MLP, vocabulary 1003; two AdamW param groups (ndim >= 2 with weight decay, the rest without).
``--frozen`` freezes layer 0's layernorms and k_proj; ``--tied`` ties lm_head to the embedding.
"""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ucp.demo_model import TinyConfig, TinyLlama
from ucp.demos._torchrun import run_module

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
           "zero_optimization": {"stage": args.stage}, "wall_clock_breakdown": False}
    if args.clipping != "default":
        cfg["gradient_clipping"] = float(args.clipping)
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
    """DeepSpeed's own gather of every trainable parameter's fp32 master and Adam states, the
    optimizer's step per param group and the clipping it applies (collective: every rank calls
    it, rank 0 saves)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    out = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}, "clip_grad": float(opt.clip_grad)}
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
    ap.add_argument("--clipping", default="1.0",
                    help="gradient_clipping of the config; 'default': left out (DeepSpeed's default applies)")
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


# ------------------------------------------------------------------ the demo chapter
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
       "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "ucp-torch-extensions")}


def run_workers(nproc: int, *args) -> None:
    """One torchrun job of this worker on ``nproc`` CPU ranks; raises with its output on failure."""
    run_module("ucp.demo_deepspeed", nproc, *args, env=ENV)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def run_chapter(root: Path, quiet: bool = False, step=lambda label, fn: fn()) -> bool:
    """ZeRO-2 x 2 ranks -> universal -> ZeRO-3 x 3 ranks, resumed by DeepSpeed; True when
    DeepSpeed's gathers match bit for bit and the next loss matches the uninterrupted run's."""
    import ucp

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    root = Path(root)
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    common = ["--dtype", "fp32", "--frozen", "--more", 1]
    step("DeepSpeed ZeRO-2 x 2 ranks: train, save", lambda: run_workers(
        2, "--out", root / "z2", "--stage", 2, "--ref", root / "ref.pt", "--losses", root / "losses.json", *common))
    step("ucp convert --from deepspeed", lambda: ucp.convert(root / "z2", root / "universal", source="deepspeed"))
    step("ucp export --to deepspeed --dp 3 --zero-stage 3", lambda: ucp.export(
        root / "universal", root / "z3", "deepspeed", degrees={"dp": 3}, zero_stage=3, sub_group_size=1000))
    step("DeepSpeed ZeRO-3 x 3 ranks: load, 1 step", lambda: run_workers(
        3, "--load", root / "z3", "--stage", 3, "--ref", root / "ref3.pt", "--losses", root / "losses3.json",
        *common))
    want, got = torch.load(root / "ref.pt", weights_only=True), torch.load(root / "ref3.pt", weights_only=True)
    bad = [f"{st}/{n}" for st in ("param", "exp_avg", "exp_avg_sq") for n, t in want[st].items()
           if not same_bits(t, got[st][n])]
    before, after = json.loads((root / "losses.json").read_text())[-1], json.loads((root / "losses3.json").read_text())
    close = abs(after[0] - before) <= 1e-5 * abs(before)
    say(f"  DeepSpeed: ZeRO-2 on 2 ranks -> universal -> ZeRO-3 on 3 ranks, loaded by DeepSpeed itself: "
        f"{sum(len(want[st]) for st in ('param', 'exp_avg', 'exp_avg_sq'))} gathered tensors "
        f"{'all bit-exact' if not bad else f'{len(bad)} DIFFER: ' + ', '.join(bad[:4])}, step "
        f"{'equal' if got['step'] == want['step'] else 'DIFFERS'}; next loss {after[0]:.6f} vs uninterrupted "
        f"{before:.6f} ({'equal within fp32 round-off' if close else 'DIFFERS'})")
    return not bad and got["step"] == want["step"] and close


if __name__ == "__main__":
    main()
