"""torchrun script: a DeepSpeed pipeline run WITH tensor parallelism, laid out as
Megatron-DeepSpeed's ``GPTModelPipe`` lays it out: ``PipelineModule`` over
``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)`` whose layers are small hand-written
Megatron-style tensor-parallel layers (Megatron-DeepSpeed itself is not installed).

Files DeepSpeed writes: ``layer_XX-model_YY-model_states.pt`` (layer XX's weights as tensor-parallel
rank YY holds them), ``mp_rank_MM_model_states.pt`` and ``[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt``
where MM is the rank in DeepSpeed's model-parallel group (pipe and model axes together:
``MM = stage * tp + tp_rank``, the topology's axes being pipe, data, model).

Model: a vocab-parallel embedding (vocabulary 1003 padded to 128 * tp rows, Megatron's
``make_vocab_size_divisible_by``; rows ``[t*V/tp, (t+1)*V/tp)`` on rank t) tied to the output head,
4 transformer layers (hidden 72, 6 heads, FFN 200, biases everywhere): fused QKV and
``dense_h_to_4h`` column-parallel (rows of the weight and of the bias), ``dense`` and
``dense_4h_to_h`` row-parallel (columns of the weight, the bias replicated), layer norms replicated,
a final layer norm. The head's logits over the padded vocabulary are gathered across tp (the padded
rows train, as in Megatron).

After ``--steps`` AdamW steps under ZeRO ``--stage`` every rank saves with ``engine.save_checkpoint``;
then the reference answers: per stage, every parameter's fp32 master, ``exp_avg`` and
``exp_avg_sq`` as DeepSpeed gathers them over dp (``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``), all-gathered over the tensor-parallel group and concatenated
along the dimension the layer split (replicated ones: tensor-parallel rank 0's, with a check that
every rank's copy is equal), saved by the stage's first rank as ``--ref``.stage{S} with
torch.save; ``--frozen`` weights as the module holds them (all-gathered the same way).

Usage: torchrun --nproc_per_node PP*TP*DP ds_pipe_tp.py --out DIR --pp 2 --tp 2 --ref FILE
       [--dtype fp32|bf16] [--stage 0|1] [--steps 2] [--frozen]
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB, VOCAB_MULTIPLE, HIDDEN, HEADS, FFN, LAYERS = 1003, 128, 72, 6, 200, 4
BATCH, SEQ = 8, 12
#: frozen by --frozen: a replicated and a column-parallel (split) weight
FROZEN = ("1.input_layernorm.weight", "2.mlp.dense_h_to_4h.bias")
TP = {"group": None, "rank": 0, "size": 1}


# ------------------------------------------------------------------ tensor-parallel autograd
class _CopyToTP(torch.autograd.Function):
    """Megatron's copy_to_tensor_model_parallel_region: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=TP["group"])
        return g


class _ReduceFromTP(torch.autograd.Function):
    """reduce_from_tensor_model_parallel_region: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, group=TP["group"])
        return x

    @staticmethod
    def backward(ctx, g):
        return g


class _GatherFromTP(torch.autograd.Function):
    """gather_from_tensor_model_parallel_region (last dim); backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(TP["size"])]
        dist.all_gather(parts, x.contiguous(), group=TP["group"])
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(TP["size"], dim=-1)[TP["rank"]].contiguous()


def init(seed, *shape, scale=0.02):
    """The full (unsplit) tensor, the same on every rank: each rank keeps its shard of it."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def shard(full, dim):
    """This tensor-parallel rank's block of ``full`` along ``dim``, as a parameter that records it
    (Megatron's attributes, by which DeepSpeed counts it once per rank in the gradient norm)."""
    p = nn.Parameter(full.chunk(TP["size"], dim=dim)[TP["rank"]].clone())
    p.tp_dim = p.partition_dim = dim
    p.tensor_model_parallel, p.partition_stride = True, 1
    return p


def replicated(full):
    p = nn.Parameter(full.clone())
    p.tp_dim = None
    return p


class ColumnParallelLinear(nn.Module):
    """Rows ``[t*n/tp, (t+1)*n/tp)`` of the weight and of the bias."""

    def __init__(self, n_in, n_out, seed):
        super().__init__()
        self.weight, self.bias = shard(init(seed, n_out, n_in), 0), shard(init(seed + 1, n_out), 0)

    def forward(self, x):
        return F.linear(_CopyToTP.apply(x), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Columns ``[t*n/tp, (t+1)*n/tp)`` of the weight; the bias whole on every rank."""

    def __init__(self, n_in, n_out, seed):
        super().__init__()
        self.weight, self.bias = shard(init(seed, n_out, n_in), 1), replicated(init(seed + 1, n_out))

    def forward(self, x):
        return _ReduceFromTP.apply(F.linear(x, self.weight)) + self.bias


class LayerNorm(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.weight = replicated(1 + init(seed, HIDDEN, scale=0.1))
        self.bias = replicated(init(seed + 1, HIDDEN))

    def forward(self, x):
        return F.layer_norm(x, (HIDDEN,), self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.query_key_value = ColumnParallelLinear(HIDDEN, 3 * HIDDEN, seed)   # [heads, 3, head_dim] rows
        self.dense = RowParallelLinear(HIDDEN, HIDDEN, seed + 2)

    def forward(self, x):
        b, s, _ = x.shape
        heads, dim = HEADS // TP["size"], HIDDEN // HEADS
        q, k, v = self.query_key_value(x).view(b, s, heads, 3, dim).unbind(3)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.dense(out.transpose(1, 2).reshape(b, s, heads * dim))


class MLP(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(HIDDEN, FFN, seed)
        self.dense_4h_to_h = RowParallelLinear(FFN, HIDDEN, seed + 2)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class TransformerLayer(nn.Module):
    """Megatron-DeepSpeed's ParallelTransformerLayerPipe names."""

    def __init__(self, index):
        super().__init__()
        seed = 100 * (index + 1)
        self.input_layernorm, self.self_attention = LayerNorm(seed), Attention(seed + 10)
        self.post_attention_layernorm, self.mlp = LayerNorm(seed + 20), MLP(seed + 30)

    def forward(self, x):
        x = x + self.self_attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


def padded_vocab():
    multiple = VOCAB_MULTIPLE * TP["size"]
    return -(-VOCAB // multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    """Rows ``[t*V/tp, (t+1)*V/tp)`` of the padded vocabulary (Megatron's VocabParallelEmbedding)."""

    def __init__(self):
        super().__init__()
        self.weight = shard(init(7, padded_vocab(), HIDDEN), 0)

    def forward(self, ids):
        rows = self.weight.shape[0]
        start = TP["rank"] * rows
        outside = (ids < start) | (ids >= start + rows)
        local = (ids - start).masked_fill(outside, 0)
        return _ReduceFromTP.apply(F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0))


class EmbeddingPipe(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding()

    def forward(self, ids):
        return self.word_embeddings(ids)


def head(module, x):
    """The tied output layer: column-parallel over the padded vocabulary, logits gathered."""
    return _GatherFromTP.apply(F.linear(_CopyToTP.apply(x), module.word_embeddings.weight))


class FinalNorm(LayerNorm):
    def __init__(self):
        super().__init__(9)


def loss_fn(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def build(pp, tp, dp):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for ranks in topo.get_axis_comm_lists("model"):     # every rank creates every group, in order
        group = dist.new_group(ranks=ranks)
        if dist.get_rank() in ranks:
            TP.update(group=group, rank=topo.get_coord(dist.get_rank()).model, size=tp)
    layers = [TiedLayerSpec("embed", EmbeddingPipe, tied_weight_attr=["word_embeddings.weight"]),
              *[LayerSpec(TransformerLayer, i) for i in range(LAYERS)], LayerSpec(FinalNorm),
              TiedLayerSpec("embed", EmbeddingPipe, forward_fn=head, tied_weight_attr=["word_embeddings.weight"])]
    return PipelineModule(layers=layers, topology=topo, loss_fn=loss_fn, partition_method="uniform",
                          base_seed=1234)


def universal_checkpoint_info():
    """What Megatron-DeepSpeed saves as ``universal_checkpoint_info`` (GPTModelPipe's patterns,
    the vocabulary sizes): how DeepSpeed's own ``ds_to_universal`` merges the tensor-parallel
    slices of these names."""
    from deepspeed.checkpoint import constants as c

    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.ORIGINAL_VOCAB_SIZE: VOCAB, c.PADDED_VOCAB_SIZE: padded_vocab(),
            c.VOCABULARY_PARAMETER_PATTERNS: [r"tied_modules.embed.word_embeddings.weight"],
            c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [r"tied_modules.embed.word_embeddings.weight"],
            c.TP_REPLICATED_PARAMETER_PATTERNS: [
                r"\d+.input_layernorm.weight", r"\d+.input_layernorm.bias", r"\d+.post_attention_layernorm.weight",
                r"\d+.post_attention_layernorm.bias", r"\d+.self_attention.dense.bias", r"\d+.mlp.dense_4h_to_h.bias",
                r"\d+.weight", r"\d+.bias"],
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r"\d+.mlp.dense_4h_to_h.weight", r"\d+.self_attention.dense.weight"]}


def batches(start, n, micro):
    for s in range(start, start + n):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1000 + s))
        for m in range(0, BATCH, micro):
            yield ids[m:m + micro, :-1], ids[m:m + micro, 1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--frozen", action="store_true", help=f"freeze {', '.join(FROZEN)}")
    ap.add_argument("--ref")
    args = ap.parse_args()

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    dp = dist.get_world_size() // (args.pp * args.tp)
    model = build(args.pp, args.tp, dp)
    for name, p in model.named_parameters():
        if args.frozen and name in FROZEN:
            p.requires_grad_(False)
    micro = BATCH // dp // 2
    cfg = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": micro, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1, "torch_adam": True}},
           "zero_optimization": {"stage": args.stage}, "gradient_clipping": 1.0,
           "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}
    if args.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    data = batches(0, args.steps, micro)
    for _ in range(args.steps):
        engine.train_batch(data)
    engine.save_checkpoint(args.out, client_state={"note": "ucp pipeline tp fixture",
                                                   "universal_checkpoint_info": universal_checkpoint_info()})
    if args.ref:
        dump_reference(engine, model, args.ref)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def gather_tp(t, dim):
    """The full tensor from every tensor-parallel rank's block (``dim`` None: rank 0's copy, and
    whether every rank's copy is bit-equal to it)."""
    parts = [torch.empty_like(t) for _ in range(TP["size"])]
    dist.all_gather(parts, t.contiguous(), group=TP["group"])
    if dim is None:
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return parts[0], all(torch.equal(p.view(bits), parts[0].view(bits)) for p in parts)
    return torch.cat(parts, dim=dim), True


def dump_reference(engine, model, path):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}, "model": {}, "frozen": {}, "unequal_replicas": [],
           "tp_dim": {}, "order": [name for name, _ in model.named_parameters()]}
    for name, p in model.named_parameters():
        got = {"frozen": p.detach()} if not p.requires_grad else {
            "param": safe_get_full_fp32_param(p), "model": p.detach(),
            **{st: safe_get_full_optimizer_state(p, st) for st in ("exp_avg", "exp_avg_sq")}}
        for st, t in got.items():
            out[st][name], equal = gather_tp(t.clone(), p.tp_dim)
            if not equal:
                out["unequal_replicas"].append((name, st))
        out["tp_dim"][name] = p.tp_dim
    out["step"] = sorted({int(s["step"]) for s in opt.optimizer.state_dict()["state"].values()})
    grid = model.mpu()
    if grid.get_data_parallel_rank() == 0 and TP["rank"] == 0:
        torch.save(out, f"{path}.stage{grid.get_pipe_parallel_rank()}")


if __name__ == "__main__":
    main()
