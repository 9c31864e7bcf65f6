"""diffusers / PEFT files (``lora_A``/``lora_B``): scale from baked factors, ``lora_adapter_metadata``,
``adapter_config.json`` beside the file, ``rank_pattern``/``alpha_pattern`` and rsLoRA.

Oracles: PEFT's own ``get_delta_weight`` on the adapter it trained/saved, and diffusers'
``load_lora_weights`` + ``fuse_lora`` on the tiny pipeline.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import assert_same_deltas, needs_diffusers, rel_err
from domerge_core.testing import tiny
from domerge_core.formats import load_lora, load_state_dict
from test_formats_kohya import assert_matches_diffusers

pytestmark = needs_diffusers


def peft_deltas(model, component_of):
    """{canonical key: ΔW} from PEFT's own LoraLayer.get_delta_weight (scaling included)."""
    from peft.tuners.lora import LoraLayer
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            out[component_of(name)] = mod.get_delta_weight("default").detach().double()
    return out


def test_diffusers_file_with_baked_scale(sd1_pipe, sd1_lora, lora_files, ref_deltas):
    lora = load_lora(lora_files["sd1_peft"])
    assert lora.format == "diffusers" and {m.scale for m in lora} == {1.0}
    assert_same_deltas(lora, ref_deltas(sd1_lora))
    assert_matches_diffusers(sd1_pipe, lora_files["sd1_peft"], lora)


def test_diffusers_file_with_adapter_metadata(sd1_pipe, sd1_lora, lora_files, ref_deltas):
    lora = load_lora(lora_files["sd1_peft_meta"])
    assert {round(m.scale, 6) for m in lora} == {0.5}        # raw factors, scale from the metadata
    assert_same_deltas(lora, ref_deltas(sd1_lora))
    assert_matches_diffusers(sd1_pipe, lora_files["sd1_peft_meta"], lora)


def test_save_lora_weights_with_patterns_and_rslora(tmp_path, sd1_pipe):
    """A file written by diffusers' own save_lora_weights from PEFT adapters with rank_pattern,
    alpha_pattern and use_rslora; both UNet and text encoder."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = tiny.tiny_sd1(seed=0, folder=str(tmp_path))
    torch.manual_seed(5)
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"],
                      rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3.0})
    tcfg = LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, target_modules=["q_proj", "fc1"],
                      alpha_pattern={"fc1": 1.0})
    pipe.unet.add_adapter(ucfg)
    # transformers' add_adapter wants peft >= 0.22; peft's own injection works on any module
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    te_layers = {k.replace(".default", ""): v for k, v in pipe.text_encoder.state_dict().items() if ".lora_" in k}
    want = peft_deltas(pipe.unet, lambda n: "unet." + n)
    want.update(peft_deltas(pipe.text_encoder, lambda n: "text_encoder.text_model." + n
                            if not n.startswith("text_model.") else "text_encoder." + n))
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=te_layers,
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    lora = load_lora(path)
    assert set(lora.modules) == set(want)
    ranks = {m.rank for k, m in lora.modules.items() if k.endswith("to_k")}
    assert ranks == {2}
    for m in lora:
        assert rel_err(m.delta().reshape(want[m.key].shape), want[m.key]) < 1e-5, m.key
    # rsLoRA: scale = alpha/sqrt(r)
    q = next(m for k, m in lora.modules.items() if k.endswith("attn1.to_q"))
    assert q.scale == pytest.approx(8 / 2.0)
    assert_matches_diffusers(sd1_pipe, path, lora)


def _tiny_llm():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=32))


def test_peft_llm_adapter_with_adapter_config_beside(tmp_path):
    """PEFT save_pretrained of an LLM adapter: base_model.model. keys + adapter_config.json."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, use_rslora=True,
                     target_modules=["q_proj", "v_proj", "gate_proj"],
                     rank_pattern={"gate_proj": 2}, alpha_pattern={"v_proj": 4})
    pm = get_peft_model(_tiny_llm(), cfg)
    want = peft_deltas(pm, lambda n: "model." + n[len("base_model.model."):])
    pm.save_pretrained(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    assert os.path.exists(tmp_path / "adapter_config.json")
    lora = load_lora(path)
    assert lora.format == "peft" and lora.base_model == "llm"
    assert set(load_lora(str(tmp_path)).modules) == set(lora.modules)      # the save_pretrained folder
    assert set(lora.modules) == set(want)
    for m in lora:
        assert rel_err(m.delta().reshape(want[m.key].shape), want[m.key]) < 1e-5, m.key
    v = next(m for k, m in lora.modules.items() if k.endswith("v_proj"))
    assert v.scale == pytest.approx(4 / 2.0)        # alpha_pattern 4 / sqrt(4)
    g = next(m for k, m in lora.modules.items() if k.endswith("gate_proj"))
    assert g.rank == 2 and g.scale == pytest.approx(16 / 2 ** 0.5)

    # the same file without its config reads as scale 1; an explicit adapter_config restores it
    os.rename(tmp_path / "adapter_config.json", tmp_path / "cfg.json")
    assert {m.scale for m in load_lora(path)} == {1.0}
    again = load_lora(path, adapter_config=str(tmp_path / "cfg.json"))
    for m in again:
        assert rel_err(m.delta().reshape(want[m.key].shape), want[m.key]) < 1e-5, m.key


def test_state_dict_with_default_adapter_names_and_alpha_keys():
    """Raw PEFT ``state_dict()`` dumps (``lora_A.default.weight``) and explicit ``.alpha`` keys."""
    g = torch.Generator().manual_seed(0)
    sd = {"unet.mid_block.attentions.0.proj_in.lora_A.default.weight": torch.randn(2, 16, generator=g),
          "unet.mid_block.attentions.0.proj_in.lora_B.default.weight": torch.randn(16, 2, generator=g),
          "unet.mid_block.attentions.0.proj_in.alpha": torch.tensor(1.0)}
    lora = load_state_dict(sd)
    m = lora["unet.mid_block.attentions.0.proj_in"]
    assert m.scale == 0.5 and m.rank == 2


def test_config_dict_argument_and_rank_mismatch_uses_real_rank():
    g = torch.Generator().manual_seed(0)
    sd = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(3, 8, generator=g),
          "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 3, generator=g)}
    lora = load_state_dict(sd, adapter_config={"r": 3, "lora_alpha": 6})
    assert lora["model.layers.0.q_proj"].scale == 2.0
    assert lora.format == "peft"


def test_adapter_config_beside_a_diffusers_file(tmp_path, sd1_pipe, ref_deltas):
    """A UNet-only diffusers file with raw factors and an adapter_config.json (r, lora_alpha and
    rank/alpha patterns) next to it."""
    keys = [k for k, _ in tiny.lora_targets(sd1_pipe, text_encoders=False)]
    odd = next(k for k in keys if k.endswith("ff.net.2"))
    lora = tiny.random_lora(sd1_pipe, rank=4, alpha=2.0, seed=9, text_encoders=False,
                            ranks={odd: 2}, alphas={odd: 5.0})
    path = tiny.write_peft(lora, str(tmp_path / "unet_lora.safetensors"), scale="config")
    assert os.path.exists(tmp_path / "adapter_config.json")
    got = load_lora(path)
    assert got[odd].rank == 2 and got[odd].scale == pytest.approx(2.5)
    assert_same_deltas(got, ref_deltas(lora))


# old attention-processor names (training scripts of diffusers 0.14-0.24) with a lora_adapter_metadata
OLD_STYLES = {
    "processor_lora": lambda base, last: f"unet.{base}.processor.{last}.lora",        # …processor.to_q.lora.down
    "compatible_linear": lambda base, last: f"unet.{base}.{last}.lora",               # …to_q.lora.down
    "attn_processor": lambda base, last: f"unet.{base}.processor.{last.split('.')[0]}_lora",   # …processor.to_q_lora.down
}


@pytest.mark.parametrize("style", sorted(OLD_STYLES))
def test_old_processor_names_with_adapter_metadata_take_alpha_over_r(tmp_path, sd1_pipe, style):
    """UNet in old attention-processor names, text encoder in lora_A/lora_B, r/lora_alpha in
    ``lora_adapter_metadata``: diffusers renames the old keys to lora_A/B and scales every module by
    lora_alpha/r (here 8/4 = 2 on the UNet). The reader did so only for lora_A/B modules (UNet read at
    scale 1); pinned against diffusers' own load_lora_weights + fuse_lora."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    sd = {}
    for n, m in sd1_pipe.unet.named_modules():
        if n.endswith((".attn1.to_q", ".attn1.to_k", ".attn2.to_v", ".attn1.to_out.0")):
            base, last = (n[:-len(".to_out.0")], "to_out.0") if n.endswith("to_out.0") else n.rsplit(".", 1)
            stem = OLD_STYLES[style](base, last)
            sd[stem + ".down.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
            sd[stem + ".up.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
    for n, m in sd1_pipe.text_encoder.named_modules():
        if n.endswith(("self_attn.q_proj", "self_attn.v_proj")):
            k = "text_encoder." + ("" if n.startswith("text_model.") else "text_model.") + n
            sd[k + ".lora_A.weight"] = torch.randn(2, m.in_features, generator=g) * 0.3
            sd[k + ".lora_B.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.3
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            "text_encoder.r": 2, "text_encoder.lora_alpha": 1, "text_encoder.target_modules": ["q_proj", "v_proj"]}
    p = str(tmp_path / f"{style}.safetensors")
    save_file(sd, p, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    lora = load_lora(p)
    assert {m.key.split(".")[0]: m.scale for m in lora} == {"unet": 2.0, "text_encoder": 0.5}
    assert_matches_diffusers(sd1_pipe, p, lora)
    # without the metadata, old names keep scale 1 (diffusers: lora_alpha defaults to r)
    save_file(sd, p, metadata={"format": "pt"})
    assert {m.scale for m in load_lora(p)} == {1.0}
