"""Real Megatron-Core GPTModel on CPU (gloo) under torchrun: save a torch_dist checkpoint, or
load checkpoints with Megatron's own ``dist_checkpointing.load`` and compare them.

    torchrun --nproc_per_node N megatron_gpt.py save DIR --tp T --pp P [--bias] [--layers L]
    torchrun --nproc_per_node N megatron_gpt.py compare REF CAND --tp T --pp P [--bias] [--layers L] [--dump D]
    torchrun --nproc_per_node N megatron_gpt.py dump CKPT OUT --tp T --pp P ...   # full state as rank files
    ... [--experts E --ep K]: MoE layers (SequentialMLP, allgather dispatcher: CPU-friendly)
    ... [--vp V]: interleaved virtual pipeline, V model chunks per stage (saved as model0, model1, ...)

``save`` writes what Megatron-LM's ``save_checkpoint`` writes through ``dist_checkpointing.save``
(``{"model": model.sharded_state_dict(), "iteration", "args", "checkpoint_version"}``).
``compare`` loads REF and CAND into GPTModels built at (T, P) — Megatron reshards REF
itself — and checks every local tensor bit-exactly on every rank. ``dump`` saves each rank's
local model state (``torch.save``, tensors only) for tests that assemble tensors themselves.

torch_dist saving calls ``torch.cuda.current_device`` / ``torch.cuda.synchronize``: stubbed
(CPU run). ``dist_checkpointing.save`` leaves multiprocessing Manager processes: their PIDs
are ended explicitly before exit.
"""
import argparse
import multiprocessing
import os
import sys

import torch

torch.cuda.current_device = lambda: torch.device("cpu")
torch.cuda.synchronize = lambda *a, **k: None

VOCAB = 1024          # 1003 padded to a multiple of 128 (Megatron-LM's make_vocab_size_divisible_by)
TRUE_VOCAB = 1003


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "compare", "dump"])
    p.add_argument("paths", nargs="+")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--bias", action="store_true")
    p.add_argument("--tied", action="store_true")
    p.add_argument("--experts", type=int, default=0, help="MoE: SequentialMLP experts per layer")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--vp", type=int, default=None, help="virtual pipeline: model chunks per stage")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dump", help="compare: also save each rank's reference state here")
    return p.parse_args()


def config(a):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=a.layers, hidden_size=96, num_attention_heads=6, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=160, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-6, add_bias_linear=a.bias, add_qkv_bias=a.bias, use_cpu_initialization=True,
        tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, expert_model_parallel_size=a.ep,
        virtual_pipeline_model_parallel_size=a.vp,
        **({"num_moe_experts": a.experts, "moe_router_topk": 2, "moe_ffn_hidden_size": 64,
            "moe_token_dispatcher_type": "allgather"} if a.experts else {}),
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0)


def build(a, seed, vp_stage=None):
    """One GPTModel; with ``--vp``, model chunk ``vp_stage`` of this pipeline stage (Megatron-LM's
    ``get_model`` builds one per virtual stage, first/last by the virtual position)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed + (vp_stage or 0))
    ignore = vp_stage is None
    return GPTModel(config(a), transformer_layer_spec=get_gpt_layer_local_spec(
                        num_experts=a.experts or None, normalization="RMSNorm"),
                    vocab_size=VOCAB, max_sequence_length=64,
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=ignore, vp_stage=vp_stage),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=ignore, vp_stage=vp_stage),
                    share_embeddings_and_output_weights=a.tied, position_embedding_type="rope",
                    **({} if vp_stage is None else {"vp_stage": vp_stage}))


def build_chunks(a, seed) -> dict:
    """``{"model": GPTModel}``, or with ``--vp`` ``{"model0": chunk 0, "model1": ...}``: the keys
    under which Megatron-LM's ``save_checkpoint`` puts each model chunk's sharded state."""
    if not a.vp:
        return {"model": build(a, seed)}
    return {f"model{v}": build(a, seed, vp_stage=v) for v in range(a.vp)}


def randomize_norms_and_biases(model, seed):
    """Megatron initialises norms to 1 and biases to 0: make them distinct so that a swapped
    tensor cannot go unnoticed. Replicated tensors get the same values on every TP rank (a
    generator seeded by the name), sharded ones their rank's own."""
    import zlib

    from megatron.core import parallel_state as ps

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                sharded = getattr(p, "tensor_model_parallel", False)
                key = name + (f"/tp{ps.get_tensor_model_parallel_rank()}" if sharded else "")
                g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
                p.copy_(torch.randn(p.shape, generator=g))


def args_namespace(a):
    """What Megatron-LM records as ``args`` in common.pt (the fields a converter needs)."""
    return argparse.Namespace(num_layers=a.layers, hidden_size=96, num_attention_heads=6, num_query_groups=2,
                              group_query_attention=True, kv_channels=16, ffn_hidden_size=160, swiglu=True,
                              normalization="RMSNorm", norm_epsilon=1e-6, add_bias_linear=a.bias,
                              add_qkv_bias=a.bias, padded_vocab_size=VOCAB, vocab_size=TRUE_VOCAB,
                              make_vocab_size_divisible_by=128, untie_embeddings_and_output_weights=not a.tied,
                              position_embedding_type="rope", rotary_base=10000, max_position_embeddings=64,
                              tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                              expert_model_parallel_size=a.ep, num_experts=a.experts or None,
                              virtual_pipeline_model_parallel_size=a.vp,
                              params_dtype=torch.float32)


def local_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state") and v is not None}


def checkpoint_names(state):
    """Local state-dict names as the checkpoint keys spell them (Megatron's own key map of the
    local layer spec: input_layernorm. -> self_attention.linear_qkv.layer_norm_, ...)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keymap = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    out = {}
    for k, v in state.items():
        for old, new in keymap.items():
            k = k.replace("." + old, "." + new)
        out[k] = v
    return out


def load_into(a, path, seed) -> dict:
    from megatron.core import dist_checkpointing

    chunks = build_chunks(a, seed)
    sd = dist_checkpointing.load({k: m.sharded_state_dict() for k, m in chunks.items()}, path)
    for k, m in chunks.items():
        m.load_state_dict(sd[k], strict=True)
    return chunks


def chunks_state(chunks: dict) -> dict:
    """Every chunk's local tensors; with several chunks the names say which (``model1.decoder...``)."""
    one = len(chunks) == 1
    return {(k if one else f"{c}.{k}"): v for c, m in chunks.items() for k, v in local_state(m).items()}


def end_managers():
    for child in multiprocessing.active_children():
        child.terminate()
        child.join()


def main():
    a = parse()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                 expert_model_parallel_size=a.ep, virtual_pipeline_model_parallel_size=a.vp)
    rank = dist.get_rank()
    ok = True
    if a.mode == "save":
        from megatron.core import dist_checkpointing

        chunks = build_chunks(a, a.seed)
        for m in chunks.values():
            randomize_norms_and_biases(m, a.seed)
        state = {**{k: m.sharded_state_dict() for k, m in chunks.items()}, "iteration": 7,
                 "checkpoint_version": 3.0, "args": args_namespace(a)}
        os.makedirs(a.paths[0], exist_ok=True)
        dist_checkpointing.save(state, a.paths[0])
    elif a.mode == "dump":
        chunks = load_into(a, a.paths[0], a.seed + 1)
        os.makedirs(a.paths[1], exist_ok=True)
        torch.save(checkpoint_names(chunks_state(chunks)), os.path.join(a.paths[1], f"rank{rank}.pt"))
    else:
        ref = chunks_state(load_into(a, a.paths[0], a.seed + 1))
        if a.dump:
            os.makedirs(a.dump, exist_ok=True)
            torch.save(checkpoint_names(ref), os.path.join(a.dump, f"rank{rank}.pt"))
        cand = chunks_state(load_into(a, a.paths[1], a.seed + 2))
        bad = sorted(k for k in ref if k not in cand or not torch.equal(ref[k], cand[k]))
        extra = sorted(set(cand) - set(ref))
        ok = not bad and not extra and bool(ref)
        print(f"rank {rank}: {len(ref)} tensors, mismatched {bad[:5]}, unexpected {extra[:5]}", flush=True)
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    dist.barrier()
    end_managers()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(int(flag.item() != 0))


if __name__ == "__main__":
    main()
