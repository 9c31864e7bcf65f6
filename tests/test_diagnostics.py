"""analyze() and the merge report: values against dense computations, JSON, the demo."""
from __future__ import annotations

import json
import math

import torch

from domerge_core import analyze
from domerge_core.report.diagnostics import block_of
from domerge_core.lora import Lora, LoraModule

torch.set_num_threads(1)

KEYS = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (48, 40),
        "unet.up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2": (40, 64),
        "text_encoder.text_model.encoder.layers.3.mlp.fc1": (64, 32)}


def make(T=3, corr=0.5, scales=(1.0, 5.0, 0.5), seed=0):
    g = torch.Generator().manual_seed(seed)
    common = {k: (torch.randn(m, 4, generator=g), torch.randn(4, n, generator=g)) for k, (m, n) in KEYS.items()}
    out = []
    for i in range(T):
        mods = {}
        for k, (m, n) in KEYS.items():
            up = scales[i] * ((1 - corr) * torch.randn(m, 4, generator=g) + corr * common[k][0])
            down = ((1 - corr) * torch.randn(4, n, generator=g) + corr * common[k][1]) / math.sqrt(n)
            mods[k] = LoraModule.from_tensors(k, up, down, 0.5)
        out.append(Lora(mods, "kohya", source=f"l{i}.safetensors"))
    return out


def dense(l, k):
    return l[k].delta(torch.float64)


def test_analyze_matches_dense_values():
    loras = make()
    w = [1.0, 0.5, 2.0]
    info = analyze(loras, weights=w, device="cpu", per_module=True)
    info = json.loads(json.dumps(info))                      # JSON-serialisable
    T = len(loras)
    # whole-model cosine matrix (before)
    for i in range(T):
        for j in range(T):
            num = sum(float((dense(loras[i], k) * dense(loras[j], k)).sum()) for k in KEYS)
            ni = math.sqrt(sum(float(dense(loras[i], k).norm() ** 2) for k in KEYS))
            nj = math.sqrt(sum(float(dense(loras[j], k).norm() ** 2) for k in KEYS))
            assert abs(info["cosine_before"][i][j] - num / ni / nj) < 1e-5
    for i, l in enumerate(info["loras"]):
        ref = math.sqrt(sum(float(dense(loras[i], k).norm() ** 2) for k in KEYS))
        assert abs(l["update_norm"] - ref) < 1e-4 * ref
        assert l["rank_max"] == 4 and l["modules"] == 3
        assert 0 < l["rel_delta_A_mean"] < 0.3 and 0 < l["rel_delta_B_mean"] < 0.3
    # magnitude distribution variance: per module normalised |w_i|·‖ΔW_i‖, variance over i, mean over modules
    mv = []
    for k in KEYS:
        s = [abs(w[i]) * float(dense(loras[i], k).norm()) for i in range(T)]
        mean = sum(s) / T
        mv.append(sum((x / mean - 1) ** 2 for x in s) / T)
    assert abs(info["magnitude_variance"] - sum(mv) / len(mv)) < 1e-5
    # orthogonalization lowered the interference
    assert info["mean_abs_cos_after"] < info["mean_abs_cos_before"]
    # truncation energy: the TA merge's energy kept at rank 4 (exact SVD of the dense sum)
    for k in KEYS:
        D = sum(wi * dense(l, k) for wi, l in zip(w, loras))
        S = torch.linalg.svdvals(D)
        kept = float((S[:4] ** 2).sum() / (S ** 2).sum())
        assert abs(info["modules"][k]["energy_kept_at_max_rank"] - kept) < 1e-4
    assert set(info["blocks"]) == {block_of(k) for k in KEYS}
    assert block_of("unet.down_blocks.1.attentions.0.x") == "unet.down_blocks.1"
    assert block_of("text_encoder.text_model.encoder.layers.3.mlp.fc1") == "text_encoder.text_model.encoder.layers.3"


def test_analyze_equal_magnitudes_have_zero_variance_and_orth_params_apply():
    loras = make(scales=(1.0, 1.0, 1.0), corr=0.0)
    for l in loras[1:]:                                        # rescale to equal norms per module
        for k in KEYS:
            f = float(dense(loras[0], k).norm() / dense(l, k).norm())
            up, down = l[k].factors()
            l.modules[k] = LoraModule.from_tensors(k, up * f, down, 0.5)
    info = analyze(loras, device="cpu", spectrum=False)
    assert info["magnitude_variance"] < 1e-10
    none = analyze(loras, device="cpu", orthogonalize_params={"orth_steps": 0}, spectrum=False)
    assert abs(none["mean_abs_cos_after"] - none["mean_abs_cos_before"]) < 1e-7


def test_demo_runs_and_shows_the_method(tmp_path):
    from domerge_core.demo import run_demo
    lines = []
    out = run_demo(out_dir=str(tmp_path), print_fn=lines.append)
    assert out["mean_abs_cos_after"] < out["mean_abs_cos_before"]
    ta, do = out["cos_with_inputs"]["ta"], out["cos_with_inputs"]["do"]
    assert min(ta) / max(ta) < 0.3 and min(do) / max(do) > 0.8
    assert len(out["written"]) == 2 and all(p.endswith(".safetensors") for p in out["written"])
    assert out["seconds"] < 10
    assert any("DO-Merging" in l for l in lines)


def test_norms_count_every_module_a_lora_has():
    """Per-LoRA and per-block ‖ΔW‖ (strength 1) over *every* module a LoRA has: modules shared
    with other LoRAs, modules only it has (they used to be left out: their records had no norms),
    and all its modules when its strength is 0 (the merge leaves it out). Dense float64 sums."""
    from domerge_core import merge
    K = list(KEYS)
    only = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"     # a block only LoRA 2 has
    shapes = {**KEYS, only: (40, 48)}
    have = [{K[0], K[1], K[2]}, {K[0], K[2]}, {K[0], only}]
    g = torch.Generator().manual_seed(3)
    loras = []
    for i, keys in enumerate(have):
        mods = {k: LoraModule.from_tensors(k, (i + 1) * torch.randn(shapes[k][0], 3, generator=g),
                                           torch.randn(3, shapes[k][1], generator=g), 0.7)
                for k in shapes if k in keys}
        loras.append(Lora(mods, "kohya", source=f"l{i}.safetensors"))

    def expect(i, block=None):
        ks = [k for k in loras[i].modules if block is None or block_of(k) == block]
        return math.sqrt(sum(float(dense(loras[i], k).norm() ** 2) for k in ks))

    for weights in ([1.0, 0.5, 2.0], [1.0, 0.5, 0.0]):
        reports = [merge(loras, m, weights=weights, device="cpu").report["diagnostics"] for m in ("ta", "do")]
        reports.append(analyze(loras, weights=weights, device="cpu", spectrum=False))
        for d in reports:
            d = json.loads(json.dumps(d))
            for i in range(3):
                ref = expect(i)
                assert abs(d["loras"][i]["update_norm"] - ref) < 1e-5 * ref, (weights, i)
                for blk, b in d["blocks"].items():
                    rb = expect(i, blk)
                    assert abs(b["update_norms"][i] - rb) < 1e-5 * max(rb, 1e-12), (weights, i, blk)
            assert set(d["blocks"]) == {block_of(k) for k in shapes}
            assert d["blocks"][block_of(only)]["update_norms"][2] > 0
        merged = reports[0]["loras"]
        assert [l["modules_merged"] for l in merged] == ([3, 2, 2] if weights[2] else [3, 2, 0])
