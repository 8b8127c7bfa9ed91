"""Run DeepSpeed ZeRO on CPU (torchrun, gloo) and dump the flat buffers it builds, as the known
answers of tests/test_lang_frameworks_deepspeed.py.

    torchrun --nproc_per_node N tests/dist/lang_ds_buffers.py OUT STAGE GROUPS TIED FROZEN SUBGROUP

Every rank writes OUT/rank{r}.pt: for each optimizer buffer DeepSpeed holds, the parameter
names in its order and the tensors (ZeRO-1/2: ``single_partition_of_fp32_groups`` and what
``state_dict()`` saves of it, the Adam moments; ZeRO-3: ``fp32_partitioned_groups_flat`` per
sub-group and each parameter's ``ds_tensor``), plus the frozen parameters' saved fragments.
Rank 0 also writes the full fp32 value of every parameter and moment
(``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``), the universal tensors.
"""
import os
import sys

import torch
import torch.distributed as dist


def model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1003, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                      tie_word_embeddings=tied, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def groups_of(m, groups: int, frozen: bool):
    names = dict(m.named_parameters())
    if frozen:
        for n in ("model.layers.0.post_attention_layernorm.weight", "model.layers.1.mlp.down_proj.weight"):
            names[n].requires_grad_(False)
    params = [p for p in m.parameters()]
    if groups == 1:
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def main():
    out, stage, groups, tied, frozen, sub_group = sys.argv[1:7]
    stage, groups, tied, frozen, sub_group = int(stage), int(groups), int(tied), int(frozen), int(sub_group)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    m = model(bool(tied))
    zero = {"stage": stage}
    if stage == 3:
        zero.update(sub_group_size=sub_group, stage3_param_persistence_threshold=0)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
           "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    param_groups = groups_of(m, groups, bool(frozen))
    engine, opt, _, _ = deepspeed.initialize(model=m, model_parameters=param_groups, config=cfg)
    torch.manual_seed(1 + rank)
    for _ in range(2):
        ids = torch.randint(0, 1003, (1, 12))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    dump = {"frozen": {}, "groups": []}
    if stage == 3:
        for i, sub in enumerate(opt.fp16_groups):
            flat = opt.fp32_partitioned_groups_flat[i]
            st = opt.optimizer.state[flat]
            dump["groups"].append({"names": [name_of[id(p)] for p in sub], "param": flat.detach().clone(),
                                   "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()})
        dump["model"] = {name_of[id(p)]: p.ds_tensor.detach().float().clone()
                         for p in engine.module.parameters()}
    else:
        saved = opt.state_dict()["single_partition_of_fp32_groups"]
        for i, grp in enumerate(opt.bit16_groups):
            flat = opt.single_partition_of_fp32_groups[i]
            st = opt.optimizer.state[flat]
            dump["groups"].append({"names": [name_of[id(p)] for p in opt.round_robin_bit16_groups[i]],
                                   "param_padded": flat.detach().clone(), "param": saved[i].clone(),
                                   "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()})
        dump["model"] = {n: t.float().clone() for n, t in engine.module.state_dict().items()}
    frag = engine._get_zero_frozen_param_attributes(engine._get_param_fragment_func)
    dump["frozen"] = {n: t.float().clone() for n, t in frag.items()}
    full = {}
    if stage < 3:  # link the moments of every group (DeepSpeed links them lazily, once)
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for n, p in engine.module.named_parameters():
        if not p.requires_grad:
            if stage == 3:
                with deepspeed.zero.GatheredParameters([p]):
                    full[n] = {"param": p.detach().float().clone()}
            else:
                full[n] = {"param": p.detach().float().clone()}
            continue
        full[n] = {"param": safe_get_full_fp32_param(p)}
        for s in ("exp_avg", "exp_avg_sq"):
            full[n][s] = safe_get_full_optimizer_state(p, s)
        full[n] = {k: v.clone() for k, v in full[n].items()}
    dump["shapes"] = {n: tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                      for n, p in engine.module.named_parameters()}
    dump["order"] = [n for n, _ in engine.module.named_parameters()]
    if rank == 0:
        torch.save(full, os.path.join(out, "full.pt"))
    torch.save(dump, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
