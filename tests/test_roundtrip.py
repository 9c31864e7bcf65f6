"""read -> write (each layout) -> read gives the same dense updates; written files load in diffusers
(PEFT for the "peft" layout) and change the pipeline exactly as the input did."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import assert_same_deltas, needs_diffusers, rel_err
from domerge_core.testing import tiny
from domerge_core.formats import FORMATS, default_format, load_lora, save_lora, to_state_dict
from domerge_core.formats.writers import adapter_config
from domerge_core.lora import Lora

CASES = [("sd1_kohya", "sd1"), ("sd1_peft_meta", "sd1"), ("sdxl_kohya_sgm", "sdxl"), ("sdxl_peft", "sdxl")]


@pytest.mark.parametrize("name,base", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_write_read_same_updates(tmp_path, lora_files, ref_deltas, sd1_lora, sdxl_lora, name, base, fmt):
    src = load_lora(lora_files[name])
    out = save_lora(src, str(tmp_path / f"{name}.{fmt}.safetensors"), format=fmt)
    back = load_lora(out)
    assert back.format == fmt
    assert_same_deltas(back, ref_deltas(sd1_lora if base == "sd1" else sdxl_lora))
    assert {m.scale for m in back} == {1.0} or fmt == "kohya"
    if fmt == "kohya":   # one alpha for the whole file
        with safe_open(out, "pt") as f:
            alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        assert len(alphas) == 1


def test_sdxl_kohya_keeps_sgm_names_and_diffusers_names(tmp_path, lora_files):
    sgm = load_lora(lora_files["sdxl_kohya_sgm"])
    dm = load_lora(lora_files["sdxl_kohya_dm"])
    a = save_lora(sgm, str(tmp_path / "a.safetensors"))
    b = save_lora(dm, str(tmp_path / "b.safetensors"))
    with safe_open(a, "pt") as f:
        ka = set(f.keys())
    with safe_open(b, "pt") as f:
        kb = set(f.keys())
    assert any(k.startswith("lora_unet_input_blocks_") for k in ka) and not any("down_blocks" in k for k in ka)
    assert any(k.startswith("lora_unet_down_blocks_") for k in kb) and not any("input_blocks" in k for k in kb)
    assert any(k.startswith("lora_te1_") for k in ka) and any(k.startswith("lora_te2_") for k in ka)


def test_merged_lora_is_writable_in_every_layout_following_first_input(tmp_path, lora_files, sdxl_lora,
                                                                       ref_deltas):
    """A "merged" Lora (scale 1, canonical keys, layout copied from the first input) in each layout."""
    first = load_lora(lora_files["sdxl_kohya_sgm"])
    mods = {}
    for m in first:
        up, down = m.scaled_factors(torch.float32)
        mods[m.key] = type(m).from_tensors(m.key, up, down.reshape(m.rank, *m.weight_shape[1:])
                                           if m.kind == "conv" else down, 1.0, kernel_size=m.kernel_size)
    merged = Lora(modules=mods, format="merged", source="<merged>", dtype=torch.float16,
                  base_model="sdxl", layout=dict(first.layout))
    assert default_format(merged) == "kohya"
    for fmt in FORMATS:
        out = save_lora(merged, str(tmp_path / f"m.{fmt}.safetensors"), format=fmt)
        back = load_lora(out)
        assert back.dtype == torch.float16
        assert_same_deltas(back, ref_deltas(sdxl_lora), tol=2e-3)     # fp16 rounding
    with safe_open(str(tmp_path / "m.kohya.safetensors"), "pt") as f:
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())


def test_dtype_is_kept_and_can_be_overridden(tmp_path, sd1_pipe):
    lora = tiny.random_lora(sd1_pipe, rank=3, alpha=1.0, seed=4, dtype=torch.bfloat16)
    p = tiny.write_kohya(lora, str(tmp_path / "bf16.safetensors"))
    src = load_lora(p)
    assert src.dtype == torch.bfloat16
    sd, md = to_state_dict(src, "diffusers")
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert md["format"] == "pt" and md["ss_network_dim"] == md["ss_network_alpha"] == "3"
    sd32, _ = to_state_dict(src, "kohya", dtype=torch.float32)
    assert {v.dtype for v in sd32.values()} == {torch.float32}


def test_metadata_is_carried_and_stale_scale_info_dropped(tmp_path, lora_files):
    src = load_lora(lora_files["sd1_peft_meta"])
    assert "lora_adapter_metadata" in src.metadata
    _, md = to_state_dict(src, "diffusers")
    assert "lora_adapter_metadata" not in md        # the scale is baked now: the config would be wrong
    k = load_lora(lora_files["sd1_kohya"])
    _, md = to_state_dict(k, "kohya")
    assert md["ss_base_model_version"] == "sd_v1"
    assert md["ss_network_dim"] == "Dynamic" and md["ss_network_alpha"] == "4"   # ranks 4 and 3, one alpha


@needs_diffusers
@pytest.mark.parametrize("name,pipe_name", [("sd1_kohya", "sd1_pipe"), ("sdxl_kohya_sgm", "sdxl_pipe")])
def test_written_files_change_the_image_like_the_input(tmp_path, request, lora_files, name, pipe_name):
    pipe = request.getfixturevalue(pipe_name)
    base = tiny.generate(pipe, size=32)
    want = tiny.image_with_lora(pipe, lora_files[name], size=32)
    assert np.abs(want - base).max() > 1e-2                 # the LoRA does something
    src = load_lora(lora_files[name])
    from domerge_core import FORMATS, LoraFormatError, check_loadable, loadable_formats
    assert loadable_formats(src) == ("kohya", "diffusers")      # peft: refused for SD-family LoRAs
    with pytest.raises(LoraFormatError, match="does not load"):
        check_loadable(src, "peft")
    for fmt in FORMATS:
        if fmt not in loadable_formats(src):
            continue
        out = save_lora(src, str(tmp_path / f"{name}.{fmt}.safetensors"), format=fmt)
        got = tiny.image_with_lora(pipe, out, size=32)
        assert np.abs(got - want).max() < 1e-4, fmt


@needs_diffusers
def test_peft_layout_loads_into_peft(tmp_path, sd1_pipe, sd1_lora):
    """format "peft" of a UNet-only LoRA: PEFT injects it with adapter_config() and applies the same ΔW."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    unet_only = Lora(modules={k: m for k, m in sd1_lora.modules.items() if k.startswith("unet.")},
                     format="merged", source="<unet>", layout={"format": "peft"})
    out = save_lora(unet_only, str(tmp_path / "unet.peft.safetensors"), format="peft")
    back = load_lora(out)
    assert set(back.modules) == set(unet_only.modules)
    from safetensors.torch import load_file
    sd = {k[len("base_model.model."):]: v for k, v in load_file(out).items()}
    unet = tiny.tiny_sd1(folder=str(tmp_path)).unet
    cfg = adapter_config(unet_only)
    cfg = {k: v for k, v in cfg.items() if k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")}
    inject_adapter_in_model(LoraConfig(**cfg), unet)
    res = set_peft_model_state_dict(unet, sd)
    assert not getattr(res, "unexpected_keys", [])
    for name, mod in unet.named_modules():
        if isinstance(mod, LoraLayer):
            want = unet_only["unet." + name].delta()
            got = mod.get_delta_weight("default").double()
            assert rel_err(got.reshape(want.shape), want) < 1e-5, name


@needs_diffusers
def test_mixed_rank_merge_written_as_kohya_loads_at_the_right_scale_in_diffusers(tmp_path, sd1_pipe):
    """A merged LoRA whose modules have different ranks (as ta/do outputs do when inputs differ) is
    written with one alpha and rank/alpha baked into ``up``: diffusers 0.42 ignores an attention
    module's alpha that differs from the file's most common one, so alpha = rank per module would
    load some modules at the wrong scale."""
    from test_formats_kohya import assert_matches_diffusers

    keys = [k for k, _ in tiny.lora_targets(sd1_pipe)]
    attn = [k for k in keys if k.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0"))]
    assert attn
    ranks = {k: 6 for k in attn}                            # a minority rank on attention modules
    merged = tiny.random_lora(sd1_pipe, rank=4, ranks=ranks, seed=11)
    out = save_lora(merged, str(tmp_path / "mixed.safetensors"), format="kohya")
    with safe_open(out, "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        assert f.metadata()["ss_network_dim"] == "Dynamic"
    assert alphas == {4.0}
    assert_matches_diffusers(sd1_pipe, out, merged)


@needs_diffusers
def test_flux_layouts_load_into_diffusers_or_are_refused(tmp_path):
    """A Flux (DiT) LoRA: 'diffusers' loads into diffusers' FluxTransformer2DModel with every module
    and the same updates; 'kohya' (lora_transformer_… names, rejected by diffusers) and 'peft' are
    refused with the reason (ComfyUI's side: tests/test_comfy_formats.py)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.tuners.lora import LoraLayer

    from domerge_core import LoraFormatError, check_loadable, load_state_dict, loadable_formats

    def tiny():
        torch.manual_seed(0)
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))

    tr = tiny()
    g = torch.Generator().manual_seed(1)
    sd = {}
    targets = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith(("transformer_blocks.0.", "single_transformer_blocks.0."))]
    for n in targets:
        w = tr.get_submodule(n).weight
        sd[f"transformer.{n}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
        sd[f"transformer.{n}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1
    src = load_state_dict(sd, source="flux_tiny")
    assert loadable_formats(src) == ("diffusers",)
    for fmt in ("kohya", "peft"):
        with pytest.raises(LoraFormatError, match="does not load"):
            check_loadable(src, fmt)
    out = save_lora(src, str(tmp_path / "flux.diffusers.safetensors"), format="diffusers")
    state = FluxPipeline.lora_state_dict(out)
    state = state[0] if isinstance(state, tuple) else state
    tr2 = tiny()
    tr2.load_lora_adapter(state, prefix="transformer", adapter_name="x")
    layers = {n: m for n, m in tr2.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(targets)
    for n, m in layers.items():
        want = src["transformer." + n].delta()
        assert rel_err(m.get_delta_weight("x").double(), want) < 1e-5, n


@needs_diffusers
def test_kohya_flux_inputs_default_to_a_layout_both_loaders_load(tmp_path):
    """Two kohya-named Flux LoRAs merged with no --format: the first input's layout (kohya, which
    diffusers rejects for a DiT) gives way to 'diffusers' instead of an error, on the CLI and in the
    Save node's 'auto'; the file loads into diffusers' FluxTransformer2DModel with the merged update.
    An explicit --format kohya is still refused with the reason."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.tuners.lora import LoraLayer

    from safetensors.torch import save_file

    from domerge_core import default_format, load_lora
    from domerge_core.cli import main

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    d = tr.get_submodule("transformer_blocks.0.attn.to_q").weight.shape[1]
    paths = []
    for s in (1, 2):
        g = torch.Generator().manual_seed(s)
        name = "lora_unet_double_blocks_0_img_attn_qkv"
        sd = {f"{name}.lora_down.weight": torch.randn(4, d, generator=g) * 0.1,
              f"{name}.lora_up.weight": torch.randn(3 * d, 4, generator=g) * 0.1, f"{name}.alpha": torch.tensor(2.0)}
        p = tmp_path / f"k{s}.safetensors"
        save_file(sd, str(p))
        paths.append(str(p))
    assert default_format(load_lora(paths[0])) == "diffusers"
    out = tmp_path / "m.safetensors"
    assert main(["merge", *paths, "-o", str(tmp_path / "k.safetensors"), "--format", "kohya", "--method", "ta",
                 "-q"]) == 2
    assert main(["merge", *paths, "-o", str(out), "--method", "ta", "--dtype", "fp32", "-q"]) == 0
    merged = load_lora(str(out))
    assert merged.format == "diffusers"
    state = FluxPipeline.lora_state_dict(str(out))
    state = state[0] if isinstance(state, tuple) else state
    tr.load_lora_adapter(state, prefix="transformer", adapter_name="x")
    layers = {n: m for n, m in tr.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == {f"transformer_blocks.0.attn.to_{x}" for x in "qkv"}
    a, b = load_lora(paths[0]), load_lora(paths[1])
    for n, m in layers.items():
        want = a["transformer." + n].delta() + b["transformer." + n].delta()
        assert rel_err(m.get_delta_weight("x").double(), want) < 1e-5, n
