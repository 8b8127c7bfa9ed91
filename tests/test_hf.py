"""Hugging Face safetensors source and target, on real ``transformers`` Llama models.

Fixtures: tiny LlamaForCausalLM built from a config (vocab 1003, hidden 96, GQA 6/2 heads,
head_dim 16), saved by ``save_pretrained`` in bf16 — tied and untied, with and without
attention biases, sharded and single-file. The reference answers are the files themselves
(``safetensors.torch.load_file``) and the logits of the original model.
"""
import json

import pytest
import torch

import ucp
from ucp.errors import UcpError

pytestmark = pytest.mark.filterwarnings("ignore")

VARIANTS = {
    # name: (tie_word_embeddings, attention_bias, max_shard_size)
    "tied-bias-sharded": (True, True, "200KB"),
    "untied-nobias-single": (False, False, None),
    "untied-bias-sharded": (False, True, "150KB"),
}
INPUT = torch.tensor([[1, 17, 1002, 5, 999, 64, 3, 512, 7, 11]])


def make_llama(path, tied, bias, shard, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1003, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, attention_bias=bias,
                      tie_word_embeddings=tied, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot go unnoticed
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    model.save_pretrained(path, max_shard_size=shard or "5GB")


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (tied, bias, shard) in VARIANTS.items():
        make_llama(base / name, tied, bias, shard)
        # the reference: the original files loaded by transformers itself (an in-memory model
        # cast with .to(bf16) also casts the rotary buffers, which from_pretrained does not)
        out[name] = (base / name, logits_of(base / name))
    return out


def as_bits(t):
    """A view that compares bit patterns (bf16/fp16 NaNs and signed zeros included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def load_all(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def logits_of(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(INPUT).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_roundtrip_is_bit_exact_and_gives_identical_logits(hf_models, variant, tmp_path):
    src, logits = hf_models[variant]
    ucp.convert(src, tmp_path / "u")                          # --from auto detects hf
    assert ucp.open(tmp_path / "u").metadata["source"]["format"] == "hf"
    ucp.export(tmp_path / "u", tmp_path / "out", "hf", max_shard_size="120KB")
    want, got = load_all(src), load_all(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(as_bits(got[k]), as_bits(want[k])), k
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert torch.equal(logits_of(tmp_path / "out"), logits)


def test_tied_head_is_recorded_not_stored(hf_models, tmp_path):
    src, _ = hf_models["tied-bias-sharded"]
    ucp.convert(src, tmp_path / "u", source="hf")
    ck = ucp.open(tmp_path / "u")
    assert "lm_head.weight" not in ck.params
    assert "tied_to" not in ck.param_meta("model.embed_tokens.weight")   # it holds the values: not an alias
    assert ck.metadata["hf"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert ck.metadata["hf"]["config"]["tie_word_embeddings"] is True
    assert "o_proj" in " ".join(ck.params)      # Llama attention_bias=True has o_proj.bias too


def test_single_file_export_when_it_fits(hf_models, tmp_path):
    src, logits = hf_models["untied-bias-sharded"]
    ucp.convert(src, tmp_path / "u")
    ucp.export(tmp_path / "u", tmp_path / "out", "hf")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
    assert torch.equal(logits_of(tmp_path / "out"), logits)


def test_unknown_tensor_is_refused_and_nothing_committed(hf_models, tmp_path):
    from safetensors.torch import save_file

    src, _ = hf_models["untied-nobias-single"]
    tensors = load_all(src)
    tensors["model.layers.0.mystery.weight"] = torch.zeros(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UcpError, match="model.layers.0.mystery.weight"):
        ucp.convert(bad, tmp_path / "u")
    assert not (tmp_path / "u" / "ucp.manifest.json").exists()


def test_index_naming_a_missing_shard_is_refused(hf_models, tmp_path):
    import shutil

    src, _ = hf_models["tied-bias-sharded"]
    shutil.copytree(src, tmp_path / "c")
    (tmp_path / "c" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UcpError, match="model-00002-of-00003.safetensors"):
        ucp.convert(tmp_path / "c", tmp_path / "u", source="hf")


@pytest.mark.parametrize("damage", ["truncated", "header", "binary config", "binary index"])
def test_damaged_files_are_one_error_naming_the_file(hf_models, tmp_path, damage, capsys):
    """A truncated or header-damaged safetensors file, or a config / index that is no text, is one
    error line naming the file (it was safetensors' own exception or a UnicodeDecodeError, exit 1)."""
    import shutil

    from ucp.cli import main

    kind = "tied-bias-sharded" if damage == "binary index" else "untied-nobias-single"
    src, _ = hf_models[kind]
    shutil.copytree(src, tmp_path / "c")
    name = {"truncated": "model.safetensors", "header": "model.safetensors", "binary config": "config.json",
            "binary index": "model.safetensors.index.json"}[damage]
    f = tmp_path / "c" / name
    raw = f.read_bytes()
    f.write_bytes({"truncated": raw[: len(raw) // 2], "header": raw[:8] + b"\xff" * 16 + raw[24:],
                   "binary config": b"\x80\x81{}", "binary index": b"\xfe\xff\x00{"}[damage])
    assert main(["convert", str(tmp_path / "c"), str(tmp_path / "u"), "--from", "hf", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ucp convert: error: ") and len(err.strip().splitlines()) == 1 and f"c/{name}" in err, err
    assert not (tmp_path / "u" / "ucp.manifest.json").exists()


def test_a_config_that_is_no_json_object_is_refused_at_convert(hf_models, tmp_path):
    import shutil

    src, _ = hf_models["untied-nobias-single"]
    shutil.copytree(src, tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("[1, 2]")
    with pytest.raises(UcpError, match=r"c/config\.json: holds a JSON list, not the object"):
        ucp.convert(tmp_path / "c", tmp_path / "u")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_shard_size": "lots"}, "max-shard-size"),
    ({"degrees": {"tp": 2}}, "degrees"),
    ({"zero_stage": 2}, "zero_stage"),
])
def test_export_refuses_bad_options_before_writing(hf_models, tmp_path, kwargs, message):
    src, _ = hf_models["untied-nobias-single"]
    ucp.convert(src, tmp_path / "u")
    with pytest.raises(UcpError, match=message):
        ucp.export(tmp_path / "u", tmp_path / "out", "hf", **kwargs)
    assert not (tmp_path / "out").exists()


def test_dcp_converted_llama_exports_to_hf_and_loads(tmp_path):
    """A Llama trained one step and saved with torch DCP (get_state_dict layout, optimizer
    included) -> universal -> HF with a given config.json: from_pretrained gives the logits of
    the trained model; only the weights are written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=1003, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, attention_bias=True,
                      tie_word_embeddings=False, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(INPUT).logits.square().mean().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "dcp"))
    cfg.save_pretrained(str(tmp_path / "cfg"))

    ucp.convert(tmp_path / "dcp", tmp_path / "u")
    assert ucp.open(tmp_path / "u").metadata["source"]["format"] == "dcp"
    ucp.export(tmp_path / "u", tmp_path / "out", "hf", config=tmp_path / "cfg")
    got = load_all(tmp_path / "out")
    assert sorted(got) == sorted(model.state_dict())
    with torch.no_grad():
        want = model(INPUT).logits
    assert torch.equal(logits_of(tmp_path / "out"), want)


def test_megatron_names_without_model_constants_need_and_take_a_config(hf_models, tmp_path):
    """A checkpoint with Megatron names that records neither Megatron's model config nor an HF
    config.json: the export to HF says how to give one (--config / config=), and with the
    model's config.json it writes the original files bit-exactly."""
    from tests._manifest_edit import rewrite_manifest

    src, logits = hf_models["untied-bias-sharded"]
    ucp.convert(src, tmp_path / "u1")
    ucp.export(tmp_path / "u1", tmp_path / "meg", "megatron")
    ucp.convert(tmp_path / "meg", tmp_path / "u2")
    rewrite_manifest(tmp_path / "u2", lambda doc: [doc["metadata"].pop(k) for k in ("megatron", "hf")])
    with pytest.raises(UcpError, match=r"spec megatron_to_hf_llama needs the model constants layers, heads, "
                                       r"kv_heads, head_dim; the checkpoint records neither a Megatron model "
                                       r"config nor an HF config\.json: pass the model's config\.json as "
                                       r"--config PATH \(Python: config=PATH\)"):
        ucp.export(tmp_path / "u2", tmp_path / "out", "hf")
    with pytest.raises(UcpError, match=r"needs the model constants layers, heads, kv_heads, head_dim; the given "
                                       r"config\.json lacks them \(num_hidden_layers, "):
        ucp.export(tmp_path / "u2", tmp_path / "out", "hf", config={"hidden_size": 96})
    assert not (tmp_path / "out").exists()
    ucp.export(tmp_path / "u2", tmp_path / "out", "hf", config=src / "config.json")
    want, got = load_all(src), load_all(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert torch.equal(as_bits(got[k]), as_bits(t)), k
    config = [json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "out")]
    assert config[0] == config[1]
    assert torch.equal(logits_of(tmp_path / "out"), logits)
