"""The DCP chapter of `ucp demo`, and the tiny GPT (with its torch layouts) it and the DCP
tests train: the shapes that break naive resharding.

Used by ``ucp demo`` (the DCP chapter), the DCP tests and ``bench/bench_dcp.py``. Awkward on
purpose: a vocabulary (1003) that neither 2, 3 nor 4 divides, grouped-query attention, a
SwiGLU width (170) that 4 and 3 do not divide, biases, LayerNorm with bias; variants with
tied embeddings and with frozen parameters (``requires_grad=False``, not in the optimizer).

Layouts (torch's own APIs, gloo on CPU): :func:`parallelize` applies tensor parallelism
(``parallelize_module``: column-wise q/k/v/gate/up, row-wise o/down) and/or FSDP2
(``fully_shard`` per block and at the root) over a device mesh; the 2-D layout is TP over
``"tp"`` then FSDP2 over ``"dp"`` (the torchtitan recipe, which gives ``_StridedShard``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ucp.demos._torchrun import run_module


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 1003
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 170
    layers: int = 2
    tied: bool = False
    frozen: bool = False      # freeze layer 0's LayerNorms and attention biases

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.hd = c.hidden // c.heads
        self.q = nn.Linear(c.hidden, c.heads * self.hd)
        self.k = nn.Linear(c.hidden, c.kv_heads * self.hd)
        self.v = nn.Linear(c.hidden, c.kv_heads * self.hd)
        self.o = nn.Linear(c.heads * self.hd, c.hidden)

    def forward(self, x):
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a share of the heads
        q = self.q(x).view(b, t, -1, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.hd).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(c.hidden, c.ffn)
        self.up = nn.Linear(c.hidden, c.ffn)
        self.down = nn.Linear(c.ffn, c.hidden)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.hidden)
        self.attn = Attention(c)
        self.ln2 = nn.LayerNorm(c.hidden)
        self.mlp = SwiGLU(c)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, c: GPTConfig = GPTConfig()):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)
        if c.tied:
            self.head.weight = self.embed.weight
        if c.frozen:
            b0 = self.blocks[0]
            for p in (b0.ln1.weight, b0.ln1.bias, b0.attn.q.bias, b0.attn.k.bias):
                p.requires_grad_(False)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def build(c: GPTConfig = GPTConfig(), seed: int = 0) -> TinyGPT:
    """The same model on every rank (seeded); LayerNorm weights/biases made distinct so that
    a wrong slice cannot pass a comparison."""
    torch.manual_seed(seed)
    m = TinyGPT(c)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if p.shape[0] == c.hidden else 0.0))
    return m


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, two groups (decay / no decay) so that
    hyper-parameters differ between groups."""
    train = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in train if p.ndim >= 2]
    rest = [p for n, p in train if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95))


def batch(step: int, c: GPTConfig, bsz: int = 8, seq: int = 16) -> torch.Tensor:
    """The global batch of ``step`` (deterministic): arithmetic token sequences (random start
    and stride), learnable from the two previous tokens, so the loss goes down."""
    g = torch.Generator().manual_seed(7000 + step)
    start = torch.randint(0, c.vocab, (bsz, 1), generator=g)
    stride = torch.randint(1, 8, (bsz, 1), generator=g)
    return (start + stride * torch.arange(seq + 1)) % c.vocab


def train_step(model, opt, step: int, dp_rank: int = 0, dp_size: int = 1, dp_group=None) -> float:
    """One AdamW step on this data-parallel rank's share of the global batch; returns the
    global mean loss (averaged over ``dp_group``; FSDP2 averages the gradients the same way)."""
    import torch.distributed as dist

    c = model.config if hasattr(model, "config") else None
    ids = batch(step, c).chunk(dp_size)[dp_rank]
    logits = model(ids[:, :-1])
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    out = loss.detach().clone()
    if dp_size > 1:
        dist.all_reduce(out, group=dp_group)
        out /= dp_size
    return float(out)


def tp_plan(model: TinyGPT) -> dict:
    """Column-wise q/k/v/gate/up (weights and biases split on dim 0), row-wise o/down
    (weights split on dim 1, biases replicated); embedding, norms and head replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(len(model.blocks)):
        for name in ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up"):
            plan[f"blocks.{i}.{name}"] = ColwiseParallel()
        plan[f"blocks.{i}.attn.o"] = RowwiseParallel()
        plan[f"blocks.{i}.mlp.down"] = RowwiseParallel()
    return plan


def parallelize(model: TinyGPT, layout: str):
    """Shard ``model`` in place for ``layout`` over the whole world; returns ``(dp_rank,
    dp_size, dp_group)`` for :func:`train_step`.

    ``fsdp``: FSDP2 over all ranks. ``tp``: TP over all ranks. ``2d``: a (dp, tp=2) mesh, TP
    then FSDP2. ``tp-dp``: TP=2 with plain data-parallel replicas (no sharding over dp: the
    saved layout is TP=2 whatever the world size). ``none``: untouched (one process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if layout == "none":
        return 0, 1, None
    world = dist.get_world_size()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        _fsdp(model, mesh)
        return mesh.get_local_rank(), world, mesh.get_group()
    if layout == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        _tp(model, mesh)
        return 0, 1, None
    if layout in ("2d", "tp-dp"):
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        _tp(model, mesh["tp"])
        if layout == "tp-dp":       # replicas see the same data: they stay identical
            return 0, 1, None
        _fsdp(model, mesh["dp"])
        return mesh["dp"].get_local_rank(), world // 2, mesh["dp"].get_group()
    raise ValueError(f"unknown layout {layout!r} (fsdp, tp, 2d, tp-dp, none)")


def _tp(model, mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, mesh, tp_plan(model))


def _fsdp(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)


# ==================================================================== the DCP chapter of `ucp demo`
TRAIN_STEPS, RESUME_STEPS = 3, 3


def _worker(mode: str, out: str) -> None:
    """One torchrun process of the demo. ``train``: FSDP2 over every rank, train, save with
    ``UniversalWriter``, go on training (the uninterrupted run). ``resume``: TP over every
    rank, load through ``UniversalReader``, train the same next steps."""
    import json
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ucp.dcp import UniversalReader, UniversalWriter

    dist.init_process_group("gloo")
    model = build(GPTConfig(), seed=0 if mode == "train" else 1)
    dp = parallelize(model, "fsdp" if mode == "train" else "tp")
    opt = optimizer(model)
    if mode == "train":
        first = [train_step(model, opt, s, *dp) for s in range(TRAIN_STEPS)]
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, storage_writer=UniversalWriter(f"{out}/universal"))
    else:
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, storage_reader=UniversalReader(f"{out}/universal"))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        first = []
    after = [train_step(model, opt, s, *dp) for s in range(TRAIN_STEPS, TRAIN_STEPS + RESUME_STEPS)]
    if dist.get_rank() == 0:
        with open(f"{out}/{mode}.json", "w") as f:
            json.dump({"world": dist.get_world_size(), "first": first, "after": after}, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _torchrun(nproc: int, mode: str, out) -> None:
    run_module("ucp.demo_dcp", nproc, mode, out)


def run_dcp_demo(directory=None, quiet: bool = False) -> bool:
    """Train TinyGPT under FSDP2 on 4 CPU ranks, save it with ``UniversalWriter``, resume it
    under TP=2 on 2 ranks through ``UniversalReader``; print the next losses of both runs side
    by side. True when they agree within fp32 round-off (the two runs reduce in different
    orders, so bit equality is not expected)."""
    import json
    import shutil
    import tempfile
    import time
    from pathlib import Path

    own = directory is None
    root = Path(tempfile.mkdtemp(prefix="ucp-demo-dcp-")) if own else Path(directory)
    shutil.rmtree(root / "universal", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _torchrun(4, "train", root)
    t1 = time.perf_counter()
    _torchrun(2, "resume", root)
    t2 = time.perf_counter()
    train = json.loads((root / "train.json").read_text())
    resume = json.loads((root / "resume.json").read_text())
    ok = all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(resume["after"], train["after"])) and \
        len(resume["after"]) == len(train["after"]) == RESUME_STEPS
    if not quiet:
        print(f"\nDCP: TinyGPT (vocab 1003, GQA, SwiGLU, biases) under FSDP2 on 4 ranks, {TRAIN_STEPS} steps "
              f"(losses {', '.join(f'{x:.4f}' for x in train['first'])}), dcp.save -> UniversalWriter "
              f"({t1 - t0:.1f} s with startup)")
        print(f"  resumed under TP=2 on 2 ranks via dcp.load(UniversalReader) ({t2 - t1:.1f} s with startup)")
        print("  step   uninterrupted (FSDP2 x4)   resumed (TP x2)")
        for i, (a, b) in enumerate(zip(train["after"], resume["after"])):
            print(f"  {TRAIN_STEPS + i:>4}   {a:24.7f}   {b:15.7f}")
        print(f"  DCP chapter: {'PASS' if ok else 'FAIL'} (equal within fp32 round-off)")
    if own and ok:
        shutil.rmtree(root, ignore_errors=True)
    return ok


if __name__ == "__main__":
    import sys as _sys

    if len(_sys.argv) != 3 or _sys.argv[1] not in ("train", "resume"):
        raise SystemExit("usage (under torchrun): python -m ucp.demo_dcp train|resume DIR")
    _worker(_sys.argv[1], _sys.argv[2])
