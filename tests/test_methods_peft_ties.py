"""Our TIES / DARE-TIES against PEFT's own ``utils/merge_utils`` functions (``ties``,
``magnitude_based_pruning``, ``calculate_majority_sign_mask``, ``disjoint_merge``, ``dare_ties``).

The definition we keep: a LoRA's strength is part of its update (``w_i·ΔW_i``, what every LoRA loader
applies, and the same as saving the LoRA with its alpha times w_i), and TIES — trim, sign election,
disjoint mean — runs on those updates. That is exactly PEFT's ``ties`` applied to the strength-scaled
updates with unit weights, tested here to float64 rounding. PEFT's ``ties(task_tensors, weights)``
instead elects the sign on the *unweighted* tensors and multiplies by the weights afterwards; the two
agree whenever all strengths are equal and positive, and differ otherwise (also tested), because in
PEFT a strength is not the same as the LoRA's own scale: a LoRA at strength −1 still votes with its
original sign, and one at 0.1 votes as loudly as at 1.
"""
from __future__ import annotations

import pytest
import torch

pm = pytest.importorskip("peft.utils.merge_utils")

from domerge_core import merge  # noqa: E402
from domerge_core.lora import Lora, LoraModule  # noqa: E402
from test_methods import SHAPES, delta64, make_loras, ref_dare_masks, rel  # noqa: E402

torch.set_num_threads(1)


def ours(loras, method, params, weights, seed=0):
    return merge(loras, method, params, weights=weights, device="cpu", compute_dtype=torch.float64, seed=seed,
                 rank=10 ** 6)


def scaled(lora: Lora, c: float) -> Lora:
    """The same LoRA saved with its scale (alpha) multiplied by c."""
    return Lora({k: LoraModule.from_tensors(k, *m.factors(torch.float64), m.scale * c, kernel_size=m.kernel_size)
                 for k, m in lora.modules.items()}, "kohya", source=lora.source)


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("density,sign", [(0.5, "total"), (0.2, "frequency"), (1.0, "total")])
def test_ties_is_peft_ties_of_the_strength_scaled_updates(T, density, sign):
    loras = make_loras(T, seed=30 + T, scales=[1.0, 3.0, 0.5, 2.0, 1.0][:T], corr=0.3)
    w = [1.0, 0.6, -0.4, 1.5, 0.8][:T]
    res = ours(loras, "ties", {"density": density, "sign_method": sign}, w)
    for key in SHAPES:
        xs = [wi * delta64(l[key]) for wi, l in zip(w, loras)]
        peft = pm.ties(xs, torch.ones(T, dtype=torch.float64), density, majority_sign_method=sign)
        assert rel(delta64(res.lora[key]), peft) < 1e-12, key


@pytest.mark.parametrize("T", [2, 4])
def test_ties_at_equal_positive_strengths_is_peft_ties_with_its_weights(T):
    loras = make_loras(T, seed=40 + T, corr=0.2)
    for c in (1.0, 0.7):
        res = ours(loras, "ties", {"density": 0.4}, [c] * T)
        for key in SHAPES:
            xs = [delta64(l[key]) for l in loras]
            peft = pm.ties(xs, torch.full((T,), c, dtype=torch.float64), 0.4, majority_sign_method="total")
            assert rel(delta64(res.lora[key]), peft) < 1e-12


def test_ties_building_blocks_are_peft_s():
    from domerge_core.methods.base import disjoint_mean, elect_sign, magnitude_trim
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 3, 17, 11, generator=g, dtype=torch.float64)
    for d in (0.1, 0.5, 0.9):
        ref = torch.stack([torch.stack([pm.magnitude_based_pruning(X[t, j], d) for j in range(3)]) for t in range(4)])
        assert torch.equal(magnitude_trim(X, d), ref)
    Xt = magnitude_trim(X, 0.5)
    for method in ("total", "frequency"):
        mask = pm.calculate_majority_sign_mask(Xt, method=method)
        assert torch.equal((Xt.sign() == elect_sign(Xt, method)) , mask)
        assert torch.allclose(disjoint_mean(Xt, elect_sign(Xt, method)), pm.disjoint_merge(Xt, mask), rtol=0, atol=1e-15)


def test_dare_ties_is_peft_dare_ties_given_the_same_draws(monkeypatch):
    """PEFT draws its DARE masks from the global RNG; with our per-module masks substituted for its
    ``prune(..., 'random')`` the rest of ``dare_ties`` is ours exactly."""
    T, p, seed = 3, 0.4, 5
    loras = make_loras(T, seed=50, corr=0.3)
    w = [1.0, 0.5, 1.2]
    res = ours(loras, "dare_ties", {"drop_rate": p}, w, seed=seed)
    for key in SHAPES:
        xs = [wi * delta64(l[key]) for wi, l in zip(w, loras)]
        masks = iter(ref_dare_masks(key, [l.name for l in loras], *xs[0].shape, p, seed))
        monkeypatch.setattr(pm, "prune", lambda t, density, method, rescale=False: t * next(masks) / density)
        peft = pm.dare_ties(xs, torch.ones(T, dtype=torch.float64), 1 - p, majority_sign_method="total")
        assert rel(delta64(res.lora[key]), peft) < 1e-12, key


def test_strength_is_the_lora_s_own_scale_for_ties_but_not_in_peft_weights():
    """Ours: a LoRA at strength w merges exactly like the LoRA saved with alpha·w at strength 1 (so a
    strength slider and a re-saved LoRA agree, and strength −1 is the negated LoRA). PEFT's weighted
    ``ties`` breaks that: the sign vote ignores the weights."""
    loras = make_loras(3, seed=60, scales=[1.0, 2.0, 0.7], corr=0.3)
    w = [1.0, -0.8, 0.3]
    a = ours(loras, "ties", {"density": 0.5}, w)
    b = ours([scaled(l, wi) for l, wi in zip(loras, w)], "ties", {"density": 0.5}, [1.0, 1.0, 1.0])
    gap = []
    for key in SHAPES:
        assert rel(delta64(a.lora[key]), delta64(b.lora[key])) < 1e-12
        peft_w = pm.ties([delta64(l[key]) for l in loras], torch.tensor(w, dtype=torch.float64), 0.5)
        gap.append(rel(peft_w, delta64(a.lora[key])))
    assert min(gap) > 1e-2, gap          # a real difference of definition, not rounding
