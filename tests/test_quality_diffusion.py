"""The diffusion quality benchmark end to end on one tiny case, so it cannot rot.

Real parts: the committed base UNet and diffusers LoRA files (benchmarks/quality/cache/diffusion),
a LoRA freshly trained with PEFT and written by diffusers' ``save_lora_weights``, read back with
``domerge_core.load_lora``, merged with ``domerge_core.merge`` and scored by the benchmark's own
denoising-gain and sample metrics. (The full benchmark is `run.py --suite all`, not CI.)
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

QUALITY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "quality")
if QUALITY not in sys.path:
    sys.path.insert(0, QUALITY)

import domerge_core  # noqa: E402
from domerge_core import Lora, LoraModule  # noqa: E402

import diffusion_train as TR  # noqa: E402
import protocols as P  # noqa: E402
import shapes as S  # noqa: E402

pytestmark = pytest.mark.skipif(not TR.is_cached([0], ["ring", S.STYLE]), reason="diffusion cache not committed")

TASKS = [S.STYLE, "ring"]


@pytest.fixture(scope="module")
def bench():
    torch.set_num_threads(1)
    from diffusion_bench import DiffusionBench
    return DiffusionBench(0, tasks=TASKS, n_eval={"val": 3, "test": 3}, n_samples=2)


def _zeroed(lora: Lora) -> Lora:
    mods = {}
    for m in lora:
        up, down = m.factors()
        mods[m.key] = LoraModule.from_tensors(m.key, torch.zeros_like(up), down, m.scale,
                                              kernel_size=m.kernel_size)
    return Lora(modules=mods, format=lora.format, source="zeroed", metadata={})


def test_peft_lora_file_reads_exactly_as_diffusers_applies_it(tmp_path):
    """A LoRA trained with PEFT and saved by diffusers: domerge's ΔW equals what diffusers loads."""
    from diffusers import StableDiffusionPipeline
    unet = TR.load_base()
    path = str(tmp_path / "ring.safetensors")
    info = TR.train_lora(unet, "ring", 1, path, steps=2)
    lora = domerge_core.load_lora(path)
    assert len(lora) > 0 and {m.rank for m in lora} == {int(info["rank"])}
    assert all(abs(m.scale - float(info["lora_alpha"]) / int(info["rank"])) < 1e-9 for m in lora)
    sd, _, md = StableDiffusionPipeline.lora_state_dict(path, return_lora_metadata=True)
    unet.load_lora_adapter(sd, adapter_name="x", prefix="unet", metadata=md)
    for m in lora:
        mod = unet.get_submodule(m.key.split(".", 1)[1])
        eff = mod.scaling["x"] * (mod.lora_B["x"].weight.flatten(1) @ mod.lora_A["x"].weight.flatten(1))
        torch.testing.assert_close(eff.detach(), m.delta(torch.float32), rtol=1e-5, atol=1e-7)


def test_scores_are_normalized_and_see_a_broken_lora(bench):
    own = bench.score(bench.loras["ring"], ["ring"], "val")["ring"]
    none = bench.score(None, ["ring"], "val")["ring"]
    assert own == pytest.approx(1.0, abs=1e-6) and none == pytest.approx(0.0, abs=1e-6)
    # the LoRA really helps its concept (else the normalization divides noise by noise)
    assert bench.ref_loss("base", "ring", "val") > 1.2 * bench.ref_loss("own", "ring", "val")
    merged = domerge_core.merge([bench.loras[t] for t in TASKS], method="do", device="cpu").lora
    both = bench.score(merged, TASKS, "val")
    assert both[S.STYLE] > 0.3, both
    # break it on purpose: the ring LoRA zeroed → its concept's gain collapses, the style's stays
    broken = domerge_core.merge([bench.loras[S.STYLE], _zeroed(bench.loras["ring"])], method="do", device="cpu").lora
    b = bench.score(broken, TASKS, "val")
    assert b["ring"] < both["ring"] - 0.2 and b[S.STYLE] > 0.3, (both, b)


def test_sample_metric_judges_the_pictures(bench):
    own = bench.extra_test(bench.loras[S.STYLE], [S.STYLE])["sample"][S.STYLE]
    assert own == pytest.approx(1.0, abs=1e-6)
    assert bench.ref_sample("own", S.STYLE) > bench.ref_sample("base", S.STYLE) + 0.2
    zero = bench.extra_test(_zeroed(bench.loras[S.STYLE]), [S.STYLE])["sample"][S.STYLE]
    assert zero < 0.6


def test_protocols_end_to_end(bench, tmp_path):
    bench.subsets = {"T=2": TASKS}
    store = {}
    cmbs = [c for c in P.reference_combos() + P.combos(["ta", "do"]) if c.label in ("stacking (ta, λ=1)", "ta", "do")]
    bench.lam_grid = (0.5, 1.0)
    P.run_grid([bench], "diffusion", cmbs, store, log=lambda s: None, sizes=("T=2",))
    for label in ("stacking (ta, λ=1)", "ta", "do"):
        for proto in P.PROTOCOLS:
            row = store[P.key("diffusion", proto, "T=2", label)]
            assert "skipped" not in row, row
            rec = row["seeds"]["0"]
            assert -1.0 < rec["test"] < 1.5 and "test_sample" in rec
    assert store[P.key("diffusion", "dropin", "T=2", "ta")]["seeds"]["0"]["lam"] is None
    assert store[P.key("diffusion", "tuned", "T=2", "ta")]["seeds"]["0"]["lam"] in (0.5, 1.0)
    ranks = P.mean_ranks(store, ["diffusion"])
    assert sorted(r["label"] for r in ranks) == sorted(["stacking (ta, λ=1)", "ta", "do"])
    assert "| **do** |" in P.md_cell_table(store, "diffusion", "tuned", "T=2")


def test_combos_with_options_and_without_plugins():
    c = P.parse_combo("do[recombine=v2,orth_gamma=0.5,balanced=false]")
    assert (c.label, c.method) == ("do[recombine=v2,orth_gamma=0.5,balanced=false]", "do")
    assert c.params == {"recombine": "v2", "orth_gamma": 0.5, "balanced": False}
    assert P.parse_combo("tsv").params == {}
    with pytest.raises(ValueError):
        P.parse_combo("do[no_such_option=1]")
    labels = [c.label for c in P.combos(["ties", "do[recombine=v2]"], plugins="none")]
    assert sorted(labels) == ["do[recombine=v2]", "ties"]
    assert "ties +DO" in [c.label for c in P.combos(["ties"])]
