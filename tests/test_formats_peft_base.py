"""PEFT adapters read against a base weight: DoRA (``lora_magnitude_vector``), OFT (``oft_R``) and
BOFT (``boft_R``/``boft_s``), and the bases they come from (a diffusers pipeline, ``--base``).

Oracle: PEFT itself. Real torch models get real PEFT adapters (``get_peft_model`` with peft's own
configs), random adapter weights, ``save_pretrained`` (safetensors + adapter_config.json); our reader's
dense ΔW must equal ``merge_and_unload()`` weight − base weight, module by module.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import needs_diffusers, rel_err
from domerge_core.errors import LoraFormatError, UnsupportedFormatError
from domerge_core.formats import load_lora, load_state_dict
from domerge_core.formats.base_pipeline import as_base, base_from_modules, base_from_pipeline

pytestmark = needs_diffusers
peft = pytest.importorskip("peft")
torch.set_num_threads(1)

TARGETS = ["tall", "wide", "conv3", "conv1"]


class Net(torch.nn.Module):
    """Every layer kind PEFT DoRA/OFT/BOFT wraps here: tall and wide Linear, 3x3 and 1x1 Conv2d."""

    def __init__(self):
        super().__init__()
        self.tall = torch.nn.Linear(16, 24)
        self.wide = torch.nn.Linear(32, 8)
        self.conv3 = torch.nn.Conv2d(8, 6, 3)
        self.conv1 = torch.nn.Conv2d(4, 12, 1)

    def forward(self, x):  # pragma: no cover - never run
        return self.tall(x)


def _peft_folder(tmp_path, config, dtype, seed=0):
    """(folder saved by PEFT, base model copy, PEFT's merged model)."""
    torch.manual_seed(seed)
    base = Net().to(dtype)
    orig = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "magnitude" in n or "boft_s" in n:      # perturbed magnitudes / scales
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:                                      # B ≠ 0, rotations away from I
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    merged = model.merge_and_unload()
    return folder, orig, merged


def _worst_vs_peft(lora, orig, merged):
    worst = 0.0
    assert {m.key for m in lora} == {f"model.{t}" for t in TARGETS}
    for m in lora:
        path = m.key.split(".", 1)[1]
        w0 = orig.get_submodule(path).weight.detach().double()
        ref = merged.get_submodule(path).weight.detach().double() - w0
        assert m.rank == min(w0.shape[0], w0[0].numel())          # dense, exact: rank min(m, n)
        worst = max(worst, rel_err(m.delta(torch.float64).reshape(ref.shape), ref))
    return worst


TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _dora(**kw):
    return peft.LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=TARGETS, **kw)


DORA = {
    "alpha_over_r": lambda: _dora(),
    "rslora": lambda: _dora(use_rslora=True),
    "patterns": lambda: _dora(rank_pattern={"wide": 2}, alpha_pattern={"conv3": 3.0}),
}
OFT = {
    "neumann": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS),
    "neumann_3_terms_r": lambda: peft.OFTConfig(r=2, oft_block_size=0, num_cayley_neumann_terms=3,
                                                target_modules=TARGETS),
    "exact_cayley": lambda: peft.OFTConfig(r=0, oft_block_size=4, use_cayley_neumann=False, target_modules=TARGETS),
    "coft": lambda: peft.OFTConfig(r=0, oft_block_size=4, coft=True, eps=0.6, target_modules=TARGETS),
    "block_share": lambda: peft.OFTConfig(r=0, oft_block_size=4, block_share=True, target_modules=TARGETS),
}
BOFT = {
    "block_size": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=TARGETS),
    "block_num": lambda: peft.BOFTConfig(boft_block_size=0, boft_block_num=2, target_modules=TARGETS),
}
CASES = [(f"dora-{k}", v) for k, v in DORA.items()] + [(f"oft-{k}", v) for k, v in OFT.items()] + \
        [(f"boft-{k}", v) for k, v in BOFT.items()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,config", CASES, ids=[c[0] for c in CASES])
def test_peft_adapter_equals_peft_merge_and_unload(tmp_path, name, config, dtype):
    folder, orig, merged = _peft_folder(tmp_path, config(), dtype)
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    marker = {"dora": "lora_magnitude_vector", "oft": ".oft_R.weight", "boft": ".boft_R"}[name.split("-")[0]]
    assert any(k.endswith(marker) for k in keys), sorted(keys)[:4]       # what peft 0.21 writes
    lora = load_lora(str(folder), base=base_from_modules({"model": orig}))
    worst = _worst_vs_peft(lora, orig, merged)
    print(f"{name} {dtype}: worst rel err vs PEFT merge_and_unload {worst:.1e}")
    assert worst < TOL[dtype]


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dora", "oft", "boft"])
def test_without_base_the_refusal_names_file_key_and_base(tmp_path, kind):
    cfg = {"dora": DORA["alpha_over_r"], "oft": OFT["neumann"], "boft": BOFT["block_size"]}[kind]()
    folder, _, _ = _peft_folder(tmp_path, cfg, torch.float32)
    f = str(folder / "adapter_model.safetensors")
    with pytest.raises(UnsupportedFormatError) as e:
        load_lora(f)
    assert e.value.file == f and e.value.key and "base" in str(e.value)
    assert {"dora": "lora_magnitude_vector", "oft": "oft_R", "boft": "boft_"}[kind] in e.value.key
    # a base without that module: "not found", naming the key
    with pytest.raises(LoraFormatError, match="not found") as e:
        load_lora(f, base=base_from_modules({"model": torch.nn.Module()})).modules["model.tall"].loader()
    assert e.value.key and e.value.file == f


def test_oft_and_boft_need_their_adapter_config(tmp_path):
    folder, orig, _ = _peft_folder(tmp_path, OFT["neumann"](), torch.float32)
    sd = load_file(str(folder / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedFormatError, match="adapter_config.json") as e:
        load_state_dict(sd, source="oft.safetensors", base=base_from_modules({"model": orig}))
    assert e.value.file == "oft.safetensors" and e.value.key.endswith("oft_R.weight")


def test_refused_peft_variants_are_named(tmp_path):
    base = base_from_modules({"model": Net()})
    cfg = {"peft_type": "BOFT", "boft_block_size": 4}
    # BOFT with two butterfly factors (trained with PEFT's CUDA extension)
    sd = {"base_model.model.tall.boft_R": torch.zeros(2, 4, 4, 4), "base_model.model.tall.boft_s": torch.ones(24, 1)}
    with pytest.raises(UnsupportedFormatError, match="butterfly") as e:
        load_state_dict(sd, source="b.safetensors", adapter_config=cfg, base=base)
    assert e.value.key == "base_model.model.tall.boft_R"
    # OFT of PEFT < 0.14: oft_r / oft_s (PEFT itself refuses them now)
    sd = {"base_model.model.tall.oft_r": torch.zeros(4, 4, 4), "base_model.model.tall.oft_s": torch.ones(24, 1)}
    with pytest.raises(UnsupportedFormatError, match="PEFT < 0.14"):
        load_state_dict(sd, source="o.safetensors", base=base)
    sd = {"base_model.model.tall.oft_R.weight": torch.zeros(4, 6)}
    with pytest.raises(UnsupportedFormatError, match="PEFT < 0.14"):        # config without oft_block_size
        load_state_dict(sd, source="o.safetensors", base=base, adapter_config={"peft_type": "OFT", "r": 4})
    with pytest.raises(UnsupportedFormatError, match="0.18"):               # the pre-0.18 Neumann series
        load_state_dict(sd, source="o.safetensors", base=base, adapter_config={
            "peft_type": "OFT", "r": 0, "oft_block_size": 4, "use_cayley_neumann": True, "peft_version": "0.17.1"})
    # use_dora without magnitudes
    sd = {"base_model.model.tall.lora_A.weight": torch.zeros(2, 16), "base_model.model.tall.lora_B.weight":
          torch.zeros(24, 2)}
    with pytest.raises(UnsupportedFormatError, match="lora_magnitude_vector"):
        load_state_dict(sd, source="d.safetensors", base=base, adapter_config={"r": 2, "lora_alpha": 2,
                                                                                "use_dora": True})
    # oft_R that does not fit the base weight's columns
    sd = {"base_model.model.tall.oft_R.weight": torch.zeros(3, 10)}
    with pytest.raises(LoraFormatError, match="oft_R has shape"):
        load_state_dict(sd, source="o.safetensors", base=base, adapter_config={
            "peft_type": "OFT", "r": 0, "oft_block_size": 5, "use_cayley_neumann": False, "peft_version": "0.21.2"})


# ------------------------------------------------------------------------------------------------
# diffusers: a PEFT DoRA saved by save_lora_weights on the tiny SD1 pipeline
# ------------------------------------------------------------------------------------------------
def _diffusers_dora(pipe, path, seed=1, text_encoder=True):
    """PEFT DoRA adapters on the pipeline's UNet and CLIP (random, B ≠ 0, magnitudes perturbed), saved
    by diffusers' ``save_lora_weights``; returns {(component, param): PEFT-merged ΔW}. The pipeline is
    left as it was."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    from domerge_core.testing import tiny

    ucfg = LoraConfig(r=4, lora_alpha=6, use_dora=True, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"])
    tcfg = LoraConfig(r=2, lora_alpha=3, use_dora=True, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet = inject_adapter_in_model(ucfg, unet)
    te = inject_adapter_in_model(tcfg, te)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in (unet, te):
            for n, p in c.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                elif "lora_" in n:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
    te_kw = dict(text_encoder_lora_layers=get_peft_model_state_dict(te),
                 text_encoder_lora_adapter_metadata=tcfg.to_dict()) if text_encoder else {}
    StableDiffusionPipeline.save_lora_weights(
        str(path), unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True,
        unet_lora_adapter_metadata=ucfg.to_dict(), **te_kw)
    out = {}
    for comp, model in (("unet", unet), ("text_encoder", te))[:2 if text_encoder else 1]:
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer):
                w0 = mod.get_base_layer().weight.detach().double().clone()
                mod.merge()
                out[(comp, tiny._model_path(model, comp, name) + ".weight")] = \
                    mod.get_base_layer().weight.detach().double() - w0
    return out


def test_diffusers_peft_dora_file_equals_peft_merge_and_diffusers_fuse(sd1_pipe, tmp_path):
    from domerge_core.testing import tiny

    ref = _diffusers_dora(sd1_pipe, tmp_path / "dora")
    f = str(tmp_path / "dora" / "pytorch_lora_weights.safetensors")
    from safetensors import safe_open
    with safe_open(f, "pt") as fh:
        assert json.loads(fh.metadata()["lora_adapter_metadata"])["unet.use_dora"] is True
        assert any(k.endswith(".lora_magnitude_vector") for k in fh.keys())
    with pytest.raises(UnsupportedFormatError, match="base"):
        load_lora(f)
    lora = load_lora(f, base=base_from_pipeline(sd1_pipe))
    assert len(lora.modules) == len(ref)
    worst = 0.0
    for m in lora:
        worst = max(worst, rel_err(m.delta(torch.float64), ref[tiny.weight_of(sd1_pipe, m.key)].reshape(m.out_features, -1)))
    print(f"diffusers PEFT DoRA: worst rel err vs PEFT merge {worst:.1e}")
    assert worst < 1e-6
    # diffusers' own load_lora_weights + fuse_lora applies PEFT DoRA on the UNet the same way
    fused = tiny.fused_deltas(sd1_pipe, f)
    unet_worst = max(rel_err(m.delta(torch.float64), fused["unet"][tiny.weight_of(sd1_pipe, m.key)[1]]
                             .reshape(m.out_features, -1)) for m in lora if m.key.startswith("unet."))
    print(f"diffusers fuse_lora, UNet: worst rel err {unet_worst:.1e}")
    assert unet_worst < 1e-6


def test_base_from_pipeline_and_as_base(sd1_pipe, tmp_path):
    fn = base_from_pipeline(sd1_pipe)
    w = sd1_pipe.unet.down_blocks[1].attentions[0].proj_in.weight
    assert torch.equal(fn("unet.down_blocks.1.attentions.0.proj_in", "x"), w)
    assert fn.shape("unet.down_blocks.1.attentions.0.proj_in") == tuple(w.shape)
    q = sd1_pipe.text_encoder.get_submodule(
        ("text_model." if hasattr(sd1_pipe.text_encoder, "text_model") else "") + "encoder.layers.0.self_attn.q_proj")
    assert torch.equal(fn("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ""), q.weight)
    assert fn("unet.no.such.module", "") is None and fn("transformer.x", "") is None and fn("unet", "") is None
    assert as_base(None) is None and as_base(fn) is fn
    assert torch.equal(as_base(sd1_pipe)("unet.conv_in", ""), sd1_pipe.unet.conv_in.weight)
    assert torch.equal(as_base({"unet": sd1_pipe.unet})("unet.conv_in", ""), sd1_pipe.unet.conv_in.weight)
    with pytest.raises(TypeError, match="bare"):
        as_base(sd1_pipe.unet)
    p = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": sd1_pipe.unet.conv_in.weight.detach().clone()}, str(p))
    assert torch.equal(as_base(str(p))("unet.conv_in", ""), sd1_pipe.unet.conv_in.weight)


def test_merge_and_load_lora_take_the_pipeline_as_base(sd1_pipe, tmp_path):
    """A notebook user passes the pipeline itself: ``load_lora(path, base=pipe)`` and
    ``merge([paths], base=pipe)`` read a PEFT DoRA file against it, equal to the explicit lookup."""
    from domerge_core import merge

    ref = _diffusers_dora(sd1_pipe, tmp_path / "dora", text_encoder=False)
    f = str(tmp_path / "dora" / "pytorch_lora_weights.safetensors")
    a = load_lora(f, base=sd1_pipe)
    b = load_lora(f, base=base_from_pipeline(sd1_pipe))
    assert len(a.modules) == len(ref) and all(torch.equal(m.delta(), b[m.key].delta()) for m in a)
    plain = tmp_path / "plain.safetensors"
    save_file({"unet.conv_in.lora_A.weight": torch.randn(2, 4 * 9), "unet.conv_in.lora_B.weight": torch.randn(
        sd1_pipe.unet.conv_in.weight.shape[0], 2)}, str(plain))
    with pytest.raises(UnsupportedFormatError, match="base"):
        merge([f, str(plain)], "ta", weights=[0.5, 0.25])
    got = merge([f, str(plain)], "ta", weights=[0.5, 0.25], base=sd1_pipe, compute_dtype=torch.float64).lora
    worst = max(rel_err(got[m.key].delta(torch.float64), 0.5 * m.delta(torch.float64)) for m in b
                if m.key != "unet.conv_in")
    assert worst < 1e-10, worst
