"""SD3 / SD3.5 (MMDiT) LoRA layouts in one canonical key space, checked against ComfyUI's own key map.

A tiny SD3.5-medium-like model (3 joint blocks, ``x_block.attn2`` in blocks 0-1, RMS qk norms, a
pre-only last context block) is built by ComfyUI's ``supported_models.SD3`` on the ``meta`` device;
``comfy.lora.model_lora_keys_unet`` gives the key map, ``comfy.utils.mmdit_to_diffusers`` the diffusers
path -> (model weight, row slice) table. For every layout ComfyUI reads (native ``diffusion_model.``,
sd-scripts ``lora_unet_``, diffusers ``transformer.``, PEFT ``base_model.model.``, OneTrainer
``lora_transformer_``, SimpleTuner ``lycoris_``), each module we read lands on the same weight rows as
ComfyUI's map says; a diffusers + native merge lines up module by module, equals the dense sum, and
its output loads in ComfyUI with every key mapped and the same patched weights as both inputs.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_support import runtime

torch.set_num_threads(1)
runtime.import_comfy_library()

import comfy.lora  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402

import domerge_core  # noqa: E402
from domerge_core.formats.names import map_name  # noqa: E402

SD3_CFG = dict(in_channels=16, patch_size=2, out_channels=16, depth=3, input_size=None, adm_in_channels=64,
               context_embedder_config={"target": "torch.nn.Linear",
                                        "params": {"in_features": 96, "out_features": 192}},
               num_patches=64, pos_embed_max_size=8, qk_norm="rms", pos_embed_scaling_factor=None,
               x_block_self_attn_layers=[0, 1])
H = 192                                  # hidden = 64 · depth: ComfyUI's qkv row offset
NOT_LOADED = ("lora key not loaded", "NOT LOADED", "SHAPE MISMATCH")


@pytest.fixture(scope="module")
def sd3():
    model = comfy.supported_models.SD3(dict(SD3_CFG)).get_model({}, "", device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d2c = comfy.utils.mmdit_to_diffusers(dict(SD3_CFG), output_prefix="diffusion_model.")
    return key_map, shapes, d2c


def _target(t, shapes):
    """A key-map value -> (model weight, first row, row count, function or None)."""
    if isinstance(t, str):
        return t, 0, shapes[t][0], None
    w, sl = t[0], t[1]
    fn = t[2] if len(t) > 2 else None
    if sl is None:
        return w, 0, shapes[w][0], fn
    assert sl[0] == 0
    return w, sl[1], sl[2], fn


def _native_modules(shapes):
    """(native path, shape) of every LoRA-able weight (Linear and the patch-embedding conv)."""
    return [(k[len("diffusion_model."):-len(".weight")], s) for k, s in shapes.items()
            if k.startswith("diffusion_model.") and k.endswith(".weight") and len(s) in (2, 4)]


def _diffusers_modules(shapes, d2c):
    """(diffusers path, shape) of every diffusers SD3 weight that exists in this model (no attn2 in the
    last block) and is LoRA-able."""
    out = []
    for k, t in d2c.items():
        if not k.endswith(".weight"):
            continue
        w, off, n, _ = _target(t, shapes) if (t if isinstance(t, str) else t[0]) in shapes else (None,) * 4
        if w is None or len(shapes[w]) not in (2, 4):
            continue
        out.append((k[: -len(".weight")], (n, *shapes[w][1:])))
    return out


LAYOUTS = {  # name -> (module name from path, family, native paths?)
    "comfy": (lambda p: f"diffusion_model.{p}", "down_up", True),
    "kohya": (lambda p: "lora_unet_" + p.replace(".", "_"), "down_up", True),
    "diffusers": (lambda p: f"transformer.{p}", "ab", False),
    "peft": (lambda p: f"base_model.model.{p}", "ab", False),
    "onetrainer": (lambda p: "lora_transformer_" + p.replace(".", "_"), "down_up", False),
    "lycoris": (lambda p: "lycoris_" + p.replace(".", "_"), "down_up", False),
}


def _modules(layout, shapes, d2c):
    namer, family, native = LAYOUTS[layout]
    mods = _native_modules(shapes) if native else _diffusers_modules(shapes, d2c)
    return [(namer(p), s) for p, s in mods], family


def _file(path, mods, family, rank=4, alpha=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in mods:
        fan_in = 1
        for x in shape[1:]:
            fan_in *= x
        down = torch.randn(rank, *shape[1:], generator=g) / fan_in ** 0.5
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.5
        if family == "ab":
            sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = down, up
        else:
            sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
            sd[name + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def _truth(key, shapes, d2c):
    """Where ComfyUI puts a canonical key: diffusers ``transformer.<path>`` through mmdit_to_diffusers,
    a native ``diffusion_model.<path>`` on its own weight."""
    comp, path = key.split(".", 1)
    if comp == "transformer":
        return _target(d2c[path + ".weight"], shapes)
    assert comp == "diffusion_model", key
    return _target(key + ".weight", shapes)


def model_rows(t, shapes):
    """A key-map value -> (model weight, the model row each row of the LoRA's ΔW lands on, in order):
    a slice's offset, and ComfyUI's ``swap_scale_shift`` (which adds the swapped ΔW) as a permutation."""
    w, off, n, fn = _target(t, shapes)
    rows = list(range(off, off + n))
    if fn is not None:
        assert fn is comfy.utils.swap_scale_shift, fn
        rows = fn(torch.tensor(rows)).tolist()          # ΔW row i lands where swap puts it
    return w, rows


def assert_lands_where_comfyui_puts_it(name, family, shape, key_map, shapes, truth, hint):
    """Our targets of a file module (canonical key + rows of the up factor) land, row by row and in
    order, where ComfyUI's key map puts the file's module: target row t is file row rows[t], which
    ComfyUI patches at model row M[rows[t]]; ComfyUI puts the canonical key's row t at truth(key)[t].
    Returns the number of targets."""
    from domerge_core.formats.canonical import row_index
    assert name in key_map, name
    w, M = model_rows(key_map[name], shapes)
    assert len(M) == shape[0], name
    in_f = 1
    for x in shape[1:]:
        in_f *= x
    m = map_name(name, family, shape[0], in_f, hint)
    covered = []
    for key, rows in m.targets:
        idx = row_index(rows, shape[0])
        w2, rows2 = truth(key)
        assert w2 == w and rows2 == [M[i] for i in idx], (name, key, rows)
        covered += idx
    assert sorted(covered) == list(range(shape[0])), (name, m.targets)
    return len(m.targets)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_sd3_module_name_lands_where_comfyui_puts_it(sd3, layout):
    """Each module name maps to the same model weight and the same rows, in the same order, as ComfyUI's
    key map: a fused qkv splits into q, k, v rows that together cover it exactly; the final modulation
    and the pre-only last context modulation (halves swapped by ComfyUI's ``swap_scale_shift``) map
    to diffusers' ``norm_out.linear`` / ``norm1_context.linear`` with their up rows swapped."""
    from domerge_core.formats.canonical import file_hint
    key_map, shapes, d2c = sd3
    mods, family = _modules(layout, shapes, d2c)
    assert len(mods) >= 35
    hint = file_hint(n for n, _ in mods)
    assert hint == ("sd3" if LAYOUTS[layout][2] else None)

    def truth(key):
        return model_rows(_truth_raw(key, d2c), shapes)

    counts = [assert_lands_where_comfyui_puts_it(n, family, s, key_map, shapes, truth, hint) for n, s in mods]
    assert counts.count(3) == (8 if LAYOUTS[layout][2] else 0)        # 3 x_block.attn + 2 attn2 + 3 context qkv
    if LAYOUTS[layout][2]:       # every native module has its diffusers name now: none stays diffusion_model.*
        keys = {k for n, s in mods for k, _ in map_name(n, family, s[0], math.prod(s[1:]), hint).targets}
        assert not [k for k in keys if k.startswith("diffusion_model.")]
        assert {"transformer.norm_out.linear", "transformer.transformer_blocks.2.norm1_context.linear"} <= keys


def _truth_raw(key, d2c):
    comp, path = key.split(".", 1)
    return d2c[path + ".weight"] if comp == "transformer" else key + ".weight"


def _comfy_delta(files, key_map, shapes, caplog):
    """What ComfyUI adds to random base weights for each (state dict, strength): its key map, its
    ``load_lora`` and ``calculate_weight`` with offsets and functions as ModelPatcher.add_patches
    passes them. Returns ({weight: ΔW float64}, bases)."""
    per: dict = {}
    with caplog.at_level(logging.WARNING):
        for sd, strength in files:
            patches = comfy.lora.load_lora(sd, key_map)
            for k, p in patches.items():
                key, off, fn = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
                per.setdefault(key, []).append((strength, p, 1.0, off, fn))
    assert not any(s in caplog.text for s in NOT_LOADED), caplog.text[-2000:]
    out = {}
    for key, plist in per.items():
        g = torch.Generator().manual_seed(abs(hash(key)) % 1000)
        base = torch.randn(shapes[key], generator=g, dtype=torch.float64)
        out[key] = comfy.lora.calculate_weight(plist, base.clone(), key, intermediate_dtype=torch.float64) - base
    return out


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("native", ["kohya", "comfy"])
def test_sd3_diffusers_and_native_merge_lines_up_and_loads_in_comfyui(sd3, tmp_path, caplog, native):
    key_map, shapes, d2c = sd3
    mods_a, fam_a = _modules("diffusers", shapes, d2c)
    mods_b, fam_b = _modules(native, shapes, d2c)
    fa = _file(tmp_path / "a.safetensors", mods_a, fam_a, seed=1)
    fb = _file(tmp_path / "b.safetensors", mods_b, fam_b, seed=2)
    a, b = domerge_core.load_lora(str(fa)), domerge_core.load_lora(str(fb))
    # every diffusers module has its native twin, including the two whose halves ComfyUI swaps
    # (norm_out.linear, the pre-only last block's norm1_context.linear: up rows in swapped order)
    assert set(a.modules) == set(b.modules) and len(a.modules) >= 42
    assert b.base_model == "sd3" and a.base_model == "sd3"
    wa, wb = 0.7, -1.3
    res = domerge_core.merge([a, b], "ta", weights=[wa, wb])
    assert set(res.lora.modules) == set(a.modules) | set(b.modules)
    worst = 0.0
    for k, m in res.lora.modules.items():
        want = (wa * a[k].delta(torch.float64) if k in a.modules else 0) + \
               (wb * b[k].delta(torch.float64) if k in b.modules else 0)
        worst = max(worst, _rel(m.delta(torch.float64), want))
    assert worst < 1e-6, worst
    # the written file (diffusers layout, the first input's) loads in ComfyUI: every key mapped, and
    # patches the model as the two inputs at their weights do
    assert domerge_core.check_loadable(res.lora, None) == "diffusers"
    out = res.save(str(tmp_path / "m.safetensors"), dtype=torch.float64)
    got = _comfy_delta([(load_file(out), 1.0)], key_map, shapes, caplog)
    want = _comfy_delta([(load_file(str(fa)), wa), (load_file(str(fb)), wb)], key_map, shapes, caplog)
    assert set(got) == set(want) and len(want) >= 35
    errs = {k: _rel(got[k], want[k]) for k in want}
    assert max(errs.values()) < 1e-6, max(errs.items(), key=lambda kv: kv[1])     # fp32 compute: ~4e-8


def test_sd3_native_first_kohya_layout_loads_in_comfyui_but_is_refused_for_diffusers(sd3, tmp_path, caplog):
    """Native first: the kohya layout writes the split modules as OneTrainer's ``lora_transformer_…``
    (ComfyUI maps them with its slices: every key loads, same patches); diffusers has no SD3 kohya
    converter, so the save surfaces refuse 'kohya' by name, and with no format asked write 'diffusers',
    which both load."""
    from domerge_core.formats.writers import to_state_dict
    key_map, shapes, d2c = sd3
    mods, fam = _modules("kohya", shapes, d2c)
    f = _file(tmp_path / "k.safetensors", mods, fam, seed=3)
    lora = domerge_core.load_lora(str(f))
    with pytest.raises(domerge_core.LoraFormatError, match="does not load"):
        domerge_core.check_loadable(lora, "kohya")
    assert domerge_core.check_loadable(lora, None) == "diffusers"       # no format asked: the one both load
    assert domerge_core.loadable_formats(lora) == ("diffusers",)
    want = _comfy_delta([(load_file(str(f)), 1.0)], key_map, shapes, caplog)
    for fmt in ("kohya", "diffusers"):
        sd, _ = to_state_dict(lora, fmt, dtype=torch.float64)
        got = _comfy_delta([(sd, 1.0)], key_map, shapes, caplog)
        assert set(got) == set(want)
        assert max(_rel(got[k], want[k]) for k in want) < 1e-9, fmt


def test_sd3_diffusers_output_loads_into_diffusers_sd3_transformer(tmp_path):
    """The written diffusers file of a native SD3 LoRA loads into diffusers' SD3Transformer2DModel with
    every split module, each with our ΔW."""
    pytest.importorskip("peft")
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft.tuners.lora import LoraLayer

    def tiny():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3,
                                     attention_head_dim=64, num_attention_heads=3, joint_attention_dim=96,
                                     caption_projection_dim=192, pooled_projection_dim=64, out_channels=16,
                                     pos_embed_max_size=8, dual_attention_layers=(0, 1), qk_norm="rms_norm")

    tr = tiny()
    g = torch.Generator().manual_seed(5)
    sd = {}
    native = {}
    for i in range(3):
        native[f"joint_blocks.{i}.x_block.attn.qkv"] = (3 * H, H)
        native[f"joint_blocks.{i}.x_block.mlp.fc1"] = (4 * H, H)
        if i < 2:
            native[f"joint_blocks.{i}.x_block.attn2.qkv"] = (3 * H, H)
            native[f"joint_blocks.{i}.context_block.attn.proj"] = (H, H)
        native[f"joint_blocks.{i}.context_block.attn.qkv"] = (3 * H, H)
    for p, (o, n) in native.items():
        name = "lora_unet_" + p.replace(".", "_")
        sd[name + ".lora_down.weight"] = torch.randn(4, n, generator=g) / n ** 0.5
        sd[name + ".lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.3
        sd[name + ".alpha"] = torch.tensor(2.0)
    src = domerge_core.load_state_dict(sd, source="sd3_native")
    assert len(src) == 8 * 3 + 3 + 2              # 8 fused qkv split in three, 3 fc1, 2 context proj
    out = domerge_core.save_lora(src, str(tmp_path / "sd3.diffusers.safetensors"), format="diffusers")
    state = StableDiffusion3Pipeline.lora_state_dict(out)
    state = state[0] if isinstance(state, tuple) else state
    tr.load_lora_adapter(state, prefix="transformer", adapter_name="x")
    layers = {n: m for n, m in tr.named_modules() if isinstance(m, LoraLayer)}
    assert {"transformer." + n for n in layers} == set(src.modules)
    worst = 0.0
    for n, m in layers.items():
        want = src["transformer." + n].delta(torch.float64)
        worst = max(worst, _rel(m.get_delta_weight("x").detach().double(), want))
    assert worst < 1e-5, worst


def test_key_aligner_of_the_merge_node_keeps_split_qkv_parts_apart(sd3, tmp_path):
    """With a MODEL connected, the merge node renames modules by the weight ComfyUI's key map patches:
    the q/k/v parts of one fused qkv are three slices (found by their canonical keys), not one weight
    three times; a diffusers SD3 LoRA's to_q lands on the same key as the native file's q part."""
    import comfy.model_patcher

    from domerge_nodes import comfy_glue

    model = comfy.supported_models.SD3(dict(SD3_CFG)).get_model({}, "", device="meta")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    _, shapes, d2c = sd3
    mods_n, fam_n = _modules("kohya", shapes, d2c)
    mods_d, fam_d = _modules("diffusers", shapes, d2c)
    native = domerge_core.load_lora(str(_file(tmp_path / "n.safetensors", mods_n, fam_n)))
    diff = domerge_core.load_lora(str(_file(tmp_path / "d.safetensors", mods_d, fam_d)))
    aligner = comfy_glue.KeyAligner(patcher, None)
    a, b = aligner.align(native), aligner.align(diff)
    assert len(a) == len(native) and len(b) == len(diff) and not aligner.unmatched
    assert "transformer.transformer_blocks.0.attn.to_k" in set(a.modules) & set(b.modules)
    assert set(a.modules) == set(b.modules)          # norm_out.linear and the pre-only norm1_context too
