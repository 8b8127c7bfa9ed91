"""``ucp export --to hf`` from a DeepSpeed checkpoint of a real ``transformers`` Llama.

Fixture (``tests/dist/hf_llama_deepspeed.py``): a LlamaForCausalLM built from a config (GQA
6/2 heads, attention biases, vocabulary 1003, untied head) trained two AdamW steps by DeepSpeed
ZeRO-2 on 2 CPU ranks (gloo) and saved with ``engine.save_checkpoint``. The parameter names
DeepSpeed records are the HF module's own, so no rename spec is involved. Reference answers:
DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` and the trained module's logits.
"""
import json

import pytest
import torch

import ucp
from _ds_env import ROOT, run_ds_job
from tests.test_hf import INPUT, as_bits, load_all, logits_of

pytestmark = pytest.mark.filterwarnings("ignore")

SCRIPT = ROOT / "tests" / "dist" / "hf_llama_deepspeed.py"


@pytest.fixture(scope="session")
def ds_llama(tmp_path_factory):
    out = tmp_path_factory.mktemp("dsllama")
    run_ds_job(SCRIPT, 2, out, timeout=900)
    trained = torch.load(out / "trained.pt", weights_only=True)
    assert torch.equal(trained["input"], INPUT)
    return out, trained


def test_deepspeed_llama_exports_to_hf_and_loads_with_identical_logits(ds_llama, tmp_path):
    out, trained = ds_llama
    ucp.convert(out / "ckpt", tmp_path / "u")                 # --from auto: a DeepSpeed checkpoint
    assert ucp.open(tmp_path / "u").metadata["source"]["format"] == "deepspeed"
    ucp.export(tmp_path / "u", tmp_path / "hf", "hf", config=out / "config", max_shard_size="300KB")
    files = load_all(tmp_path / "hf")
    assert sorted(files) == sorted(trained["weights"])
    for name, want in trained["weights"].items():
        assert torch.equal(as_bits(files[name]), as_bits(want)), name
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1          # sharded as asked
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    got = logits_of(tmp_path / "hf")
    assert torch.equal(got, logits_of_weights(out / "config", trained["weights"]))
    # and they are the trained run's: its module's logits, computed in the torchrun process
    # (other thread count, so float sums may round differently)
    torch.testing.assert_close(got, trained["logits"], rtol=1e-5, atol=1e-6)


def logits_of_weights(config_dir, weights):
    """Logits of a LlamaForCausalLM built from the config holding DeepSpeed's gathered weights
    (in this process, as ``logits_of`` computes the export's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_dir)))
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model.eval()(INPUT).logits


def test_export_without_a_config_warns_that_none_is_written(ds_llama, tmp_path):
    out, _ = ds_llama
    ucp.convert(out / "ckpt", tmp_path / "u")
    with pytest.warns(UserWarning, match=r"no config.json written.*deepspeed source.*config="):
        ucp.export(tmp_path / "u", tmp_path / "hf", "hf")
    assert not (tmp_path / "hf" / "config.json").exists()
