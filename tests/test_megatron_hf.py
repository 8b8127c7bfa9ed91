"""Across frameworks: HF Llama -> universal -> Megatron TP=2 (loaded by a real GPTModel at
TP=2) -> universal -> HF, bit-exact with identical logits.

Renames and fusing come from ``converters/megatron_to_hf_llama.ucp``. The TP=2 local shards
that Megatron's ``dist_checkpointing.load`` puts into the GPTModel are checked against shards
built here from the HF tensors by hand (groups of [q heads, k, v] per rank, [gate_r; up_r],
vocabulary rows padded to 1024), not through the planner.
"""
import json

import pytest
import torch

import ucp
from tests.test_hf import load_all, logits_of
from tests.test_megatron import FFN, GROUPS, HEAD_DIM, HEADS, ranks, torchrun

pytestmark = pytest.mark.filterwarnings("ignore")
TP = 2


def make_llama_fp32(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=1003, hidden_size=96, intermediate_size=FFN, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=GROUPS, head_dim=HEAD_DIM,
                      attention_bias=True, mlp_bias=True, tie_word_embeddings=False, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    model.save_pretrained(path)


def expected_tp_shard(hf: dict, name: str, r: int) -> torch.Tensor:
    """Rank r's local Megatron tensor, built from the HF tensors by hand."""
    layer = name.split(".")[2] if name.startswith("decoder.layers.") else None
    p = f"model.layers.{layer}." if layer is not None else ""
    per = GROUPS // TP
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        w = name.rsplit(".", 1)[1]
        q, k, v = (hf[f"{p}self_attn.{x}_proj.{w}"] for x in "qkv")
        qh = HEADS // GROUPS * HEAD_DIM
        return torch.cat([torch.cat([q[g * qh:(g + 1) * qh], k[g * HEAD_DIM:(g + 1) * HEAD_DIM],
                                     v[g * HEAD_DIM:(g + 1) * HEAD_DIM]]) for g in range(r * per, (r + 1) * per)])
    if name.endswith("linear_fc1.weight") or name.endswith("linear_fc1.bias"):
        w = name.rsplit(".", 1)[1]
        half = FFN // TP
        return torch.cat([hf[f"{p}mlp.gate_proj.{w}"][r * half:(r + 1) * half],
                          hf[f"{p}mlp.up_proj.{w}"][r * half:(r + 1) * half]])
    if name.endswith("linear_proj.weight"):
        return hf[f"{p}self_attn.o_proj.weight"][:, r * 48:(r + 1) * 48]
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        src = hf["model.embed_tokens.weight" if name.startswith("embedding") else "lm_head.weight"]
        padded = torch.cat([src, torch.zeros(1024 - src.shape[0], src.shape[1])])
        return padded[r * 512:(r + 1) * 512]
    plain = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
             "self_attention.linear_proj.bias": "self_attn.o_proj.bias", "mlp.linear_fc2.bias": "mlp.down_proj.bias"}
    for meg, h in plain.items():
        if name.endswith(meg):
            return hf[p + h]
    if name.endswith("linear_fc2.weight"):
        return hf[f"{p}mlp.down_proj.weight"][:, r * (FFN // TP):(r + 1) * (FFN // TP)]
    assert name == "decoder.final_layernorm.weight", name
    return hf["model.norm.weight"]


def test_hf_to_megatron_tp2_and_back_is_bit_exact(tmp_path):
    make_llama_fp32(tmp_path / "hf")
    ucp.convert(tmp_path / "hf", tmp_path / "u1")
    ucp.export(tmp_path / "u1", tmp_path / "meg", "megatron", degrees={"tp": TP})

    torchrun(TP, "dump", tmp_path / "meg", tmp_path / "dump", "--tp", TP, "--layers", 2, "--bias")
    hf = load_all(tmp_path / "hf")
    for r, local in enumerate(ranks(tmp_path / "dump")):
        assert len(local) == 10 * 2 + 3
        for name, t in local.items():
            assert torch.equal(t, expected_tp_shard(hf, name, r)), (r, name)

    ucp.convert(tmp_path / "meg", tmp_path / "u2")
    ucp.export(tmp_path / "u2", tmp_path / "back", "hf")
    back = load_all(tmp_path / "back")
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())
    assert torch.equal(logits_of(tmp_path / "back"), logits_of(tmp_path / "hf"))


def test_tied_hf_model_goes_to_a_tied_gptmodel_and_back(tmp_path):
    """tie_word_embeddings: no lm_head in the files, none in the Megatron checkpoint; a
    GPTModel with share_embeddings_and_output_weights loads it; back to HF bit-exact."""
    from tests.test_hf import make_llama

    make_llama(tmp_path / "hf", tied=True, bias=False, shard=None)
    ucp.convert(tmp_path / "hf", tmp_path / "u1")
    ucp.export(tmp_path / "u1", tmp_path / "meg", "megatron", degrees={"tp": 1})
    torchrun(1, "dump", tmp_path / "meg", tmp_path / "dump", "--tp", 1, "--layers", 2, "--tied")
    local = ranks(tmp_path / "dump")[0]
    hf = load_all(tmp_path / "hf")
    assert "output_layer.weight" not in local
    emb = local["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:1003], hf["model.embed_tokens.weight"].float()) and not emb[1003:].any()
    ucp.convert(tmp_path / "meg", tmp_path / "u2")
    ucp.export(tmp_path / "u2", tmp_path / "back", "hf")
    back = load_all(tmp_path / "back")
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    assert torch.equal(logits_of(tmp_path / "back"), logits_of(tmp_path / "hf"))
