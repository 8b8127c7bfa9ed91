"""Megatron-Core's DistributedOptimizer on CPU (gloo) under torchrun: train a GPTModel one
Adam step and save model + distributed-optimizer state the way Megatron-LM's
``save_checkpoint`` does, or load such a checkpoint back with Megatron's own
``dist_checkpointing.load`` and dump what the optimizer then holds.

    torchrun --nproc_per_node N megatron_distopt.py save DIR --tp T --sharding fully_reshardable|dp_reshardable
    torchrun --nproc_per_node N megatron_distopt.py dump DIR OUT --tp T --sharding ...

Megatron-Core's code runs as it is; only what ties it to CUDA is replaced:

* ``torch.cuda.current_device`` -> the CPU device, ``torch.cuda.synchronize`` -> no-op,
  ``Tensor.cuda()`` -> the tensor itself (the buffers and gathers land on the CPU);
* ``Tensor.type()`` reports a CPU float tensor as ``torch.cuda.FloatTensor`` (the optimizer
  checks parameter types by that string);
* the CUDA RNG tracker's ``fork`` (around attention dropout, which is 0 here) is a no-op;
* loading into torch's Adam (the fallback without Apex / Transformer Engine) copies only the
  loaded keys, under ``no_grad`` (see :func:`_set_states`);
* NCCL-only collectives (``reduce_scatter_tensor``, ``all_gather_into_tensor`` and the
  coalescing manager around them) run as their gloo equivalents (``all_reduce`` and
  ``all_gather`` on views of the same buffers), synchronously.

``dump`` writes, per rank, ``{"param": {name: tensor}, "exp_avg": ..., "exp_avg_sq": ...,
"step": int, "param_groups": [...]}`` for the rank's local model parameters, read from the
optimizer after ``load_state_dict`` (the whole local parameter: its DP shard is gathered
with Megatron's own ``get_parameter_state_dp_zero``).
"""
import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import megatron_gpt  # noqa: E402  (the same model, args and CUDA stubs)

_type = torch.Tensor.type


def _cuda_type(self, dtype=None, non_blocking=False, **kw):
    if dtype is None and not kw and self.device.type == "cpu":
        return _type(self).replace("torch.", "torch.cuda.", 1)
    return _type(self, dtype, non_blocking, **kw)


torch.Tensor.type = _cuda_type
torch.Tensor.cuda = lambda self, *a, **k: self


class _Done:
    def wait(self):
        return None


def _reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    dist.all_reduce(input, op=op, group=group)
    n = output.numel()
    output.copy_(input.view(-1)[dist.get_rank(group) * n:(dist.get_rank(group) + 1) * n].view_as(output))
    return _Done() if async_op else None


def _all_gather_into_tensor(output, input, group=None, async_op=False):
    n = input.numel()
    dist.all_gather(list(output.view(-1).split(n)), input.reshape(-1).clone(), group=group)
    return _Done() if async_op else None


@contextlib.contextmanager
def _coalescing(group=None, device=None, async_ops=False):
    yield _Done() if async_ops else None


class _CpuTorch:
    """``torch`` as a Megatron module sees it, with ``device='cuda'`` factories made on the CPU."""
    FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name not in self.FACTORIES:
            return value

        def on_cpu(*args, **kw):
            if str(kw.get("device", "")).startswith("cuda"):
                kw["device"] = "cpu"
            return value(*args, **kw)
        return on_cpu


def _set_states(self, model_param, tensors):
    """Megatron's ``_set_main_param_and_optimizer_states`` for torch's Adam (its CPU fallback
    when neither Apex nor Transformer Engine is there): that optimizer keeps ``step`` in the
    per-parameter state, which the loaded tensors do not carry (``step`` comes from the
    param groups), and the fp32 main params are views of the model's leaves: copy the
    loaded keys without recording autograd history."""
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **self.optimizer.state[main_param]}
    with torch.no_grad():
        for key in dst:
            if key != "step":
                dst[key].copy_(tensors[key])


def stub_collectives():
    import importlib

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron.core.distributed import param_and_grad_buffer as pgb

    for mod in ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer",
                "megatron.core.optimizer.clip_grads", "megatron.core.distributed.param_and_grad_buffer",
                "megatron.core.utils",
                "megatron.core.distributed.distributed_data_parallel"):
        importlib.import_module(mod).torch = _CpuTorch()

    from megatron.core import tensor_parallel

    # dropout is 0: the CUDA RNG fork around attention dropout draws nothing
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states
    pgb.dist_reduce_scatter_func = _reduce_scatter_tensor
    pgb.dist_all_gather_func = _all_gather_into_tensor
    pgb._coalescing_manager = _coalescing
    dist.reduce_scatter_tensor = _reduce_scatter_tensor
    dist.all_gather_into_tensor = _all_gather_into_tensor


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "dump"])
    p.add_argument("paths", nargs="+")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--bias", action="store_true")
    p.add_argument("--bucket-size", type=int, default=None)
    p.add_argument("--sharding", default="fully_reshardable", choices=["fully_reshardable", "dp_reshardable"])
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    a.tied, a.experts, a.ep, a.vp = False, 0, 1, None
    return a


def build(a, seed):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = megatron_gpt.build(a, seed)
    megatron_gpt.randomize_norms_and_biases(model, seed)
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                                 overlap_grad_reduce=False, bucket_size=a.bucket_size))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, bf16=False,
                                                 fp16=False, params_dtype=torch.float32,
                                                 use_distributed_optimizer=True), [ddp])
    return ddp, opt


def train_step(ddp, opt, a):
    """One real step on a batch that differs per DP rank (so the gradients must be reduced)."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(a.seed + ps.get_data_parallel_rank())
    tokens = torch.randint(0, megatron_gpt.TRUE_VOCAB, (2, 17), generator=g)
    position_ids = torch.arange(16).unsqueeze(0).expand(2, 16)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    causal = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), diagonal=1)   # True: masked out
    loss = ddp(tokens[:, :-1], position_ids, causal, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok, "optimizer step skipped"


def sharded_state(ddp, opt, a, is_loading):
    model_sd = ddp.module.sharded_state_dict()          # Megatron-LM saves the unwrapped model
    state = {"model": model_sd}
    state["optimizer"] = opt.sharded_state_dict(state, is_loading,
                                                metadata={"distrib_optim_sharding_type": a.sharding})
    return state


def dump(ddp, opt, path):
    """The optimizer's view of every local parameter, gathered over DP by Megatron's code."""
    from megatron.core import parallel_state as ps

    opt = getattr(opt, "chained_optimizers", [opt])
    assert len(opt) == 1, "one DistributedOptimizer expected (dense model, one model chunk)"
    opt = opt[0]
    inner = opt.optimizer.state_dict()
    full = opt.get_parameter_state_dp_zero(use_gloo_comm=True, return_on_all_ranks=True)
    names = {p: n for n, p in ddp.module.named_parameters()}
    out = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for gbuf_idx, buffer in enumerate(opt.buffers):
        (world,) = full[gbuf_idx].values()          # one (param, grad) dtype per buffer
        for p, (start, end, _) in buffer.param_index_map.items():
            for key in out:
                out[key][names[p]] = world[key][start:end].reshape(p.shape).clone()
    out["step"] = int(next(iter(inner["state"].values()))["step"].item())
    out["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
    out = {k: (megatron_gpt.checkpoint_names(v) if isinstance(v, dict) else v) for k, v in out.items()}
    torch.save(out, os.path.join(path, f"rank{ps.get_tensor_model_parallel_rank()}_"
                                  f"dp{ps.get_data_parallel_rank()}_pp{ps.get_pipeline_model_parallel_rank()}.pt"))


def main():
    a = parse()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo")
    stub_collectives()
    ps.initialize_model_parallel(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp)
    if a.mode == "save":
        ddp, opt = build(a, a.seed)
        train_step(ddp, opt, a)
        state = sharded_state(ddp, opt, a, is_loading=False)
        args = megatron_gpt.args_namespace(a)       # + what Megatron-LM records of the DDP / optimizer run
        args.data_parallel_size = ps.get_data_parallel_world_size()
        args.use_distributed_optimizer, args.ddp_bucket_size = True, a.bucket_size
        state.update(iteration=1, checkpoint_version=3.0, args=args)
        os.makedirs(a.paths[0], exist_ok=True)
        dist_checkpointing.save(state, a.paths[0])
    else:
        ddp, opt = build(a, a.seed + 1)
        train_step(ddp, opt, a)                  # state tensors exist before loading (as Megatron-LM)
        loaded = dist_checkpointing.load(sharded_state(ddp, opt, a, is_loading=True), a.paths[0])
        ddp.module.load_state_dict(loaded["model"], strict=True)
        opt.load_state_dict(loaded["optimizer"])
        os.makedirs(a.paths[1], exist_ok=True)
        dump(ddp, opt, a.paths[1])
    dist.barrier()
    megatron_gpt.end_managers()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
