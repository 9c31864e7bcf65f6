"""kohya / A1111 / LyCORIS LoRA files: the reader's dense updates equal what diffusers applies.

Oracle: ``pipe.load_lora_weights(file)`` + ``fuse_lora`` on a tiny pipeline (tiny.fused_deltas);
every module our reader finds must carry exactly the weight change diffusers makes, and diffusers
must change no other weight.
"""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_same_deltas, needs_diffusers, rel_err
from domerge_core.testing import tiny
from domerge_core.errors import LoraFormatError
from domerge_core.formats import load_lora, load_state_dict


def assert_matches_diffusers(pipe, path, lora, tol=1e-5):
    """Reader's s·B·A per module == diffusers' fused weight change; no other weight changed."""
    fused = tiny.fused_deltas(pipe, path)
    for m in lora:
        comp, w = tiny.weight_of(pipe, m.key)
        got = fused.get(comp, {}).pop(w, None)
        assert got is not None, f"diffusers did not patch {m.key}"
        assert rel_err(m.delta(torch.float64).reshape(got.shape), got) < tol, m.key
    leftover = {c: sorted(d) for c, d in fused.items() if d}
    assert not leftover, f"diffusers patched modules the reader did not report: {leftover}"


@needs_diffusers
def test_sd1_kohya_locon_matches_diffusers(sd1_pipe, sd1_lora, lora_files, ref_deltas):
    lora = load_lora(lora_files["sd1_kohya"])
    assert lora.format == "kohya"
    assert len(lora) == len(sd1_lora) == 91
    assert sum(1 for m in lora if m.kind == "conv" and m.kernel_size == (3, 3)) > 0   # LoCon present
    assert {m.scale for m in lora} == {0.5}                                           # 2/4 and 1.5/3
    assert_same_deltas(lora, ref_deltas(sd1_lora))
    assert_matches_diffusers(sd1_pipe, lora_files["sd1_kohya"], lora)


@needs_diffusers
def test_sdxl_kohya_sgm_names_match_diffusers(sdxl_pipe, sdxl_lora, lora_files, ref_deltas):
    lora = load_lora(lora_files["sdxl_kohya_sgm"])
    assert lora.layout["unet_names"] == "sgm"
    assert lora.base_model == "sdxl"
    assert any(m.source_name.startswith("lora_unet_input_blocks_") for m in lora)
    assert any(m.source_name.startswith("lora_te2_") for m in lora)
    assert_same_deltas(lora, ref_deltas(sdxl_lora))
    assert_matches_diffusers(sdxl_pipe, lora_files["sdxl_kohya_sgm"], lora)


@needs_diffusers
def test_kohya_per_module_rank_and_alpha_fp16(sd1_pipe, tmp_path):
    """Ranks and alphas that vary per module (on modules where diffusers honours them), fp16 factors.
    (A module without .alpha has scale 1 for kohya/ComfyUI, but diffusers gives it the file's common
    alpha, so that rule is tested against kohya's definition in the test below, not against diffusers.)"""
    keys = [k for k, _ in tiny.lora_targets(sd1_pipe)]
    convs = [k for k in keys if "resnets" in k and k.endswith(("conv1", "conv2"))]
    ffs = [k for k in keys if k.endswith("ff.net.2")]
    lora = tiny.random_lora(sd1_pipe, rank=4, alpha=2.0, seed=3, dtype=torch.float16,
                            ranks={convs[0]: 2, ffs[0]: 6}, alphas={convs[0]: 8.0, ffs[0]: 1.0})
    sd = tiny.kohya_state_dict(lora, alpha_dtype=torch.float16)
    path = str(tmp_path / "mixed.safetensors")
    save_file(sd, path)
    got = load_lora(path)
    assert got.dtype == torch.float16
    assert got[convs[0]].rank == 2 and got[convs[0]].scale == pytest.approx(4.0)
    assert got[ffs[0]].rank == 6 and got[ffs[0]].scale == pytest.approx(1 / 6)
    assert_matches_diffusers(sd1_pipe, path, got)


def _tucker_reference(up, mid, down):
    """ComfyUI's tucker_weight_from_conv / LyCORIS: einsum('i j k l, j r, i p -> p r k l')."""
    return torch.einsum("ijkl,jr,ip->prkl", mid.double(), down.flatten(1).double(), up.flatten(1).T.double())


def test_tucker_lora_mid_is_folded_into_down():
    g = torch.Generator().manual_seed(0)
    out_c, in_c, r = 8, 6, 3
    up = torch.randn(out_c, r, 1, 1, generator=g)
    mid = torch.randn(r, r, 3, 3, generator=g)
    down = torch.randn(r, in_c, 1, 1, generator=g)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    lora = load_state_dict({f"{name}.lora_up.weight": up, f"{name}.lora_mid.weight": mid,
                            f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.5)},
                           source="tucker.safetensors")
    m = lora["unet.down_blocks.0.resnets.0.conv1"]
    assert m.kind == "conv" and m.kernel_size == (3, 3) and m.rank == r
    assert m.weight_shape == (out_c, in_c, 3, 3)
    want = 0.5 * _tucker_reference(up, mid, down)
    assert rel_err(m.delta().reshape(want.shape), want) < 1e-6


def test_missing_alpha_means_scale_one_and_lora_te_prefix():
    g = torch.Generator().manual_seed(1)
    sd = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32, generator=g),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2, generator=g),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 32, generator=g),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, 2, generator=g),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
    lora = load_state_dict(sd)
    assert lora["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale == 1.0
    assert lora["text_encoder.text_model.encoder.layers.0.mlp.fc1"].scale == 0.5


def test_bare_clip_names_are_accepted():
    """transformers 5 CLIP has no ``text_model``: bare ``lora_te_encoder_layers_…`` lines up with the
    canonical ``text_model.`` key."""
    g = torch.Generator().manual_seed(2)
    a = load_state_dict({"lora_te_encoder_layers_1_self_attn_v_proj.lora_down.weight": torch.randn(2, 8, generator=g),
                         "lora_te_encoder_layers_1_self_attn_v_proj.lora_up.weight": torch.randn(8, 2, generator=g)})
    assert list(a.modules) == ["text_encoder.text_model.encoder.layers.1.self_attn.v_proj"]


def test_kohya_lora_is_lazy(lora_files, monkeypatch):
    """Loading reads the header and alphas only; factor tensors are read when asked for."""
    from domerge_core.formats import safetensors as dio
    calls = []
    orig, orig_raw = dio.LazyFile._raw, dio.LazyFile.raw
    monkeypatch.setattr(dio.LazyFile, "_raw", lambda self, k, t: (calls.append(k), orig(self, k, t))[1])
    monkeypatch.setattr(dio.LazyFile, "raw", lambda self, k: orig_raw(self, k))
    lora = load_lora(lora_files["sd1_kohya"])
    assert calls and all(k.endswith(".alpha") for k in calls)
    calls.clear()
    next(iter(lora)).factors()
    assert len(calls) == 2 and not any(k.endswith(".alpha") for k in calls)


def test_unknown_kohya_key_is_named(tmp_path):
    sd = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
          "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2),
          "lora_unet_mid_block_attentions_0_proj_in.something_else": torch.zeros(2)}
    path = str(tmp_path / "odd.safetensors")
    save_file(sd, path)
    with pytest.raises(LoraFormatError) as e:
        load_lora(path)
    assert e.value.file == path and e.value.key.endswith("something_else")
    assert "odd.safetensors" in str(e.value) and "something_else" in str(e.value)
