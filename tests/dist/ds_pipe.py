"""torchrun script: a DeepSpeed pipeline-parallel run (``PipelineModule`` with ``LayerSpec`` and
``TiedLayerSpec``), the layout Megatron-DeepSpeed writes: ``layer_XX-model_states.pt`` per layer,
``mp_rank_XX_model_states.pt`` per pipeline stage and ``[bf16_]zero_pp_rank_{dp}_mp_rank_XX_optim_states.pt``.

Model (small, awkward shapes): a tied embedding (vocabulary 1003) used again as the output
head, 2 Llama blocks (hidden 72, GQA 6/2 heads, SwiGLU 136, biases on q/k/v), a final norm.
Every rank saves with ``engine.save_checkpoint`` after a few ``train_batch`` steps; rank 0 then
dumps DeepSpeed's own answers: per stage, the fp32 master, Adam moments and ``step`` of every
parameter, gathered with ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``.

Usage: torchrun --nproc_per_node P*D ds_pipe.py --out DIR --pp P --dtype fp32|bf16 --stage 0|1 [--frozen] --ref FILE
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ucp.demo_model import Block, RMSNorm, TinyConfig  # noqa: E402

CONFIG = TinyConfig(vocab_size=1003, hidden_size=72, intermediate_size=136, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2)
BATCH, SEQ = 8, 12
#: frozen by --frozen (names as the pipeline module gives them: layer index first)
FROZEN = ("1.input_layernorm.weight", "1.self_attn.k_proj.bias")


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(CONFIG.vocab_size, CONFIG.hidden_size) * 0.02)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


def head(module, x):
    """The tied output projection: the embedding's weight used again."""
    return x @ module.weight.t()


class BiasBlock(Block):
    def __init__(self):
        super().__init__(CONFIG)
        c, a = CONFIG, self.self_attn
        a.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=True)
        a.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=True)


class Norm(RMSNorm):
    def __init__(self):
        super().__init__(CONFIG.hidden_size, CONFIG.rms_norm_eps)


def loss_fn(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def build(pp: int):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    torch.manual_seed(1234)
    layers = [TiedLayerSpec("embed", Embed), *[LayerSpec(BiasBlock) for _ in range(CONFIG.num_hidden_layers)],
              LayerSpec(Norm), TiedLayerSpec("embed", Embed, forward_fn=head)]
    return PipelineModule(layers=layers, num_stages=pp, loss_fn=loss_fn, partition_method="uniform",
                          base_seed=1234)


def batches(start, n, micro):
    for s in range(start, start + n):
        g = torch.Generator().manual_seed(1000 + s)
        ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g)
        for m in range(0, BATCH, micro):
            yield ids[m:m + micro, :-1], ids[m:m + micro, 1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--frozen", action="store_true", help=f"freeze {', '.join(FROZEN)}")
    ap.add_argument("--ref")
    args = ap.parse_args()

    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    dp = world // args.pp
    model = build(args.pp)
    for name, p in model.named_parameters():
        if args.frozen and name in FROZEN:
            p.requires_grad_(False)
    micro = BATCH // dp // 2
    cfg = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": micro, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1, "torch_adam": True}},
           "zero_optimization": {"stage": args.stage}, "gradient_clipping": 1.0}
    if args.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    data = batches(0, args.steps, micro)
    for _ in range(args.steps):
        engine.train_batch(data)
    engine.save_checkpoint(args.out, client_state={"note": "ucp pipeline fixture", "universal_checkpoint_info": {}})
    if args.ref:
        dump_reference(engine, model, args.ref)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def dump_reference(engine, model, path):
    """Per pipeline stage (the stage's data-parallel rank 0 saves ``path``.stage{S}): every
    trainable parameter's fp32 master and Adam moments, gathered by DeepSpeed, the optimizer's
    steps, and the frozen weights as the module holds them, keyed by the pipeline module's names."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}, "frozen": {}}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            out["frozen"][name] = p.detach().clone()
            continue
        out["param"][name] = safe_get_full_fp32_param(p).clone()
        for st in ("exp_avg", "exp_avg_sq"):
            out[st][name] = safe_get_full_optimizer_state(p, st).clone()
    inner = opt.optimizer.state_dict()
    out["step"] = sorted({int(s["step"]) for s in inner["state"].values()})
    grid = model.mpu()
    if grid.get_data_parallel_rank() == 0:
        torch.save(out, f"{path}.stage{grid.get_pipe_parallel_rank()}")


if __name__ == "__main__":
    main()
