"""``ucp demo``: the whole story on a small embedded model, checked at every step.

1. train a tiny Llama-shaped model for a few AdamW steps;
2. save it as a distributed checkpoint: per-rank files of a TP=2 x ZeRO-3 DP=2 layout
   declared in the spec language (the rank-files target, ``ucp.targets.ranks``);
3. ``ucp convert`` it to the universal form and ``ucp verify`` it;
4. ``ucp export`` it to TP=3 x DP=1 (uneven splits: 1003 and 200 rows over 3 ranks) and check
   every tensor of every rank against the original, bit for bit;
5. resume training from the universal checkpoint on the new layout and check that the next
   losses equal those of the uninterrupted run;
6. every chapter in ``ucp.demos`` whose framework is installed (see that package).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from ucp.errors import UcpError
from ucp.plugins import local_path

DEMO_SPEC = """\
# Demo layout: Megatron-style tensor parallelism with ZeRO-3 flat partitions over dp.
spec demo_tp_zero3
axes tp, dp

param "model.embed_tokens.weight"                  = shard(0, over=tp) | flat(over=dp)
param "model.layers.{i}.self_attn.q_proj.weight"   = shard(0, over=tp) | flat(over=dp)
param "model.layers.{i}.self_attn.k_proj.weight"   = shard(0, over=tp) | flat(over=dp)
param "model.layers.{i}.self_attn.v_proj.weight"   = shard(0, over=tp) | flat(over=dp)
param "model.layers.{i}.self_attn.o_proj.weight"   = shard(1, over=tp) | flat(over=dp)
param "model.layers.{i}.mlp.gate_proj.weight"      = shard(0, over=tp) | flat(over=dp)
param "model.layers.{i}.mlp.up_proj.weight"        = shard(0, over=tp) | flat(over=dp)
param "model.layers.{i}.mlp.down_proj.weight"      = shard(1, over=tp) | flat(over=dp)
param "model.layers.{i}.input_layernorm.weight"    = replicate(over=tp) | flat(over=dp)
param "model.layers.{i}.post_attention_layernorm.weight" = replicate(over=tp) | flat(over=dp)
param "model.norm.weight"                          = replicate(over=tp) | flat(over=dp)
param "lm_head.weight"                             = shard(0, over=tp) | flat(over=dp)
"""

STEPS_BEFORE, STEPS_AFTER = 3, 2


def _say(quiet, *a):
    if not quiet:
        print(*a, flush=True)


def training_state(model, opt):
    """{state: {name: tensor}}, per-param scalars and JSON metadata of a model + AdamW."""
    names = {id(p): n for n, p in model.named_parameters()}
    states = {"param": {n: p.detach().clone() for n, p in model.named_parameters()},
              "exp_avg": {}, "exp_avg_sq": {}}
    scalars = {}
    for p, st in opt.state.items():
        n = names[id(p)]
        states["exp_avg"][n] = st["exp_avg"].clone()
        states["exp_avg_sq"][n] = st["exp_avg_sq"].clone()
        scalars[n] = {"step": float(st["step"])}
    groups = []
    for g in opt.param_groups:
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [names[id(p)] for p in g["params"]]})
    meta = {"optimizer": {"class": type(opt).__name__, "param_groups": groups},
            "iteration": STEPS_BEFORE, "rng": {"torch": torch.get_rng_state()},
            "model_config": model.config.to_dict()}
    return states, scalars, meta


def resume_from_universal(path):
    """Build model + AdamW from a universal checkpoint alone (what a new job would do)."""
    import ucp
    from ucp.demo_model import TinyConfig, TinyLlama

    ck = ucp.open(path)
    md = ck.metadata
    model = TinyLlama(TinyConfig(**md["model_config"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ck.read(n, "param"))
    by_name = dict(model.named_parameters())
    groups = []
    for g in md["optimizer"]["param_groups"]:
        g = dict(g)
        g["params"] = [by_name[n] for n in g["params"]]
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt = torch.optim.AdamW(groups)
    for n, p in model.named_parameters():
        opt.state[p] = {"step": torch.tensor(ck.param_meta(n)["scalars"]["step"]),
                        "exp_avg": ck.read(n, "exp_avg"), "exp_avg_sq": ck.read(n, "exp_avg_sq")}
    torch.set_rng_state(md["rng"]["torch"])
    return model, opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so NaN payloads and -0.0 compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _equal(a: dict, b: dict) -> tuple[int, list[str]]:
    bad, n = [], 0
    for st in a:
        for name, t in a[st].items():
            n += 1
            u = b.get(st, {}).get(name)
            if u is None or u.dtype != t.dtype or u.shape != t.shape or not torch.equal(_bits(u), _bits(t)):
                bad.append(f"{st}/{name}")
    return n, bad


class _Steps:
    """Timed steps of the demo, printed as a table at the end."""

    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    def __call__(self, label, fn):
        t0 = time.perf_counter()
        res = fn()
        self.rows.append((label, time.perf_counter() - t0))
        return res


def _train(quiet, step):
    """Train the tiny model, keep its state, and run the uninterrupted continuation."""
    from ucp.demo_model import TinyConfig, TinyLlama, make_optimizer, train_steps

    cfg = TinyConfig()
    torch.manual_seed(0)
    model = TinyLlama(cfg)
    opt = make_optimizer(model)
    losses = step("train 3 steps (AdamW)", lambda: train_steps(model, opt, 0, STEPS_BEFORE))
    _say(quiet, f"  model: tiny Llama, {sum(p.numel() for p in model.parameters()):,} "
                f"parameters, vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, GQA {cfg.num_attention_heads}/"
                f"{cfg.num_key_value_heads}; losses {', '.join(f'{x:.4f}' for x in losses)}")
    saved = training_state(model, opt)
    # The uninterrupted run goes on from here; the resumed one must match it.
    rng = torch.get_rng_state()
    ref_losses = train_steps(model, opt, STEPS_BEFORE, STEPS_AFTER)
    torch.set_rng_state(rng)
    return saved, ref_losses


def _core_story(root: Path, quiet: bool, step) -> bool:
    """Rank files -> convert -> verify -> export at another degree -> compare -> resume."""
    import ucp
    from ucp.demo_model import train_steps
    from ucp.format import verify
    from ucp.sources.ranks import load_ranks_full
    from ucp.targets.ranks import save_ranks

    (states, scalars, meta), ref_losses = _train(quiet, step)
    src, uni, dst = root / "tp2-dp2", root / "universal", root / "tp3"
    step("save TP=2 x ZeRO-3 DP=2 rank files", lambda: save_ranks(
        states, src, spec_text=DEMO_SPEC, spec_name="<demo spec>", degrees={"tp": 2, "dp": 2},
        scalars=scalars, metadata=meta))
    _say(quiet, f"  saved 4 rank files (TP=2 x DP=2): {', '.join(sorted(p.name for p in src.glob('rank*.pt')))}")
    step("ucp convert -> universal", lambda: ucp.convert(src, uni, source="ranks"))
    problems = step("ucp verify", lambda: verify(uni, deep=True))
    ck = ucp.open(uni)
    _say(quiet, f"  universal: {len(ck.params)} parameters x {len(ck.states(ck.params[0]))} states, "
                f"verify: {'OK' if not problems else problems}")
    step("ucp export -> TP=3 rank files", lambda: ucp.export(uni, dst, "ranks", degrees={"tp": 3, "dp": 1}))
    n, bad = _equal(states, step("reassemble TP=3 and compare", lambda: load_ranks_full(dst)))
    _say(quiet, f"  TP=3 export: {n} tensors compared bit-exactly with the trained model: "
                f"{'all equal' if not bad else f'{len(bad)} DIFFER: ' + ', '.join(bad[:5])}")
    model2, opt2 = step("resume from universal", lambda: resume_from_universal(uni))
    got = step("train 2 more steps", lambda: train_steps(model2, opt2, STEPS_BEFORE, STEPS_AFTER))
    same = got == ref_losses
    _say(quiet, "  resumed losses " + ", ".join(f"{x:.6f}" for x in got) + "  vs uninterrupted "
         + ", ".join(f"{x:.6f}" for x in ref_losses) + ("  (identical)" if same else "  (DIFFER)"))
    return not problems and not bad and same


def chapters() -> list:
    """Further chapters: every module of ``ucp.demos`` (framework plug-ins add one each)
    with ``TITLE``, ``available() -> bool`` (e.g. the framework is installed) and
    ``run(root: Path, quiet: bool) -> bool``; in name order."""
    import importlib
    import pkgutil

    try:
        import ucp.demos as pkg
    except ImportError:
        return []
    mods = [importlib.import_module(f"ucp.demos.{m.name}") for m in sorted(pkgutil.iter_modules(pkg.__path__),
                                                                          key=lambda m: m.name)
            if not m.name.startswith("_")]
    return [m for m in mods if m.available()]


#: the file that marks a folder as the demo's own, so that a later demo may clear it
DEMO_MARK = ".ucp-demo"


def _claim(root: Path) -> None:
    """Make ``root`` the demo's: new, empty, or marked by an earlier demo (whose folders it then
    clears). A folder holding anything else is refused: the demo's folder names (``universal``,
    the one every example converts into) would otherwise replace a user's checkpoint."""
    if root.exists() and not root.is_dir():
        raise UcpError(f"{root}: not a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / DEMO_MARK).is_file():
        raise UcpError(f"{root}: the folder holds files no demo wrote, which the demo would replace; "
                       "give it a new or empty folder (or none: a temporary one)")
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARK).write_text("made by `ucp demo`: a later `ucp demo` here replaces everything in this folder\n")
    for sub in root.iterdir():
        if sub.is_dir():
            shutil.rmtree(sub)


def run_demo(directory=None, quiet=False) -> bool:
    """Run the demo in ``directory`` (a temporary one, removed on success, by default), which must
    be new, empty or an earlier demo's; True when every check of every chapter passed."""
    own = directory is None
    root = Path(tempfile.mkdtemp(prefix="ucp-demo-")) if own else local_path(directory, "ucp demo writes")
    _claim(root)
    step = _Steps()
    _say(quiet, f"ucp demo in {root}")
    ok = _core_story(root, quiet, step)
    for chapter in chapters():
        _say(quiet, f"\n{chapter.TITLE}")
        where = root / chapter.__name__.rsplit(".", 1)[-1]
        shutil.rmtree(where, ignore_errors=True)
        ok &= bool(step(chapter.TITLE, lambda: chapter.run(where, quiet)))
    if not quiet:
        print("\n  step                                   seconds")
        for label, t in step.rows:
            print(f"  {label:<38} {t:7.3f}")
        print(f"\nucp demo: {'PASS' if ok else 'FAIL'}")
    if own and ok:
        shutil.rmtree(root, ignore_errors=True)
    return ok
