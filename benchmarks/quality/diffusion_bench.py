"""Scoring merged LoRAs on the tiny diffusion model (one seed = one `DiffusionBench`).

Per LoRA task (a concept, or the style):

- **denoising gain** (val and test): ε-MSE on held-out pictures of the task at fixed timesteps
  and fixed noise, over the task's region (a concept: its shape's pixels; the style: the
  background and border), so a merge that draws the concept *in* the style is not penalised; ``(L_base − L_merged) / (L_base − L_own LoRA)`` — 1 = as good as the task's
  own LoRA, 0 = no better than the base;
- **sample score** (test only): pictures from a fixed-seed 10-step DDIM sampler for the task's
  token(s), judged by a small CNN trained on the clean data (concept: mean P(concept); style:
  mean P(styled) over the base subjects); reported as merged / own LoRA.

The LoRAs are the real diffusers files in the cache, read with ``domerge_core.load_lora``.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import diffusion_model as M
import diffusion_train as TR
import shapes as S

EVAL_T = (100, 250, 400, 600)      # fixed timesteps of the denoising loss
N_EVAL = {"val": 8, "test": 12}    # held-out pictures per task and split (× 4 timesteps)
N_SAMPLES = 6                      # sampler pictures per task (test)
SAMPLE_STEPS = 10
LAM_GRID = (0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.25)


class DiffusionBench:
    name = "diffusion"
    lam_grid = LAM_GRID

    def __init__(self, seed: int, tasks: Sequence[str] = TR.LORAS, n_eval: Optional[Dict[str, int]] = None,
                 n_samples: int = N_SAMPLES, unet=None, judge=None, lora_paths: Optional[Dict[str, str]] = None):
        import domerge_core
        self.seed = seed
        self.tasks = list(tasks)
        self.unet = unet if unet is not None else TR.load_base()
        self.judge = judge if judge is not None else TR.load_judge()
        self.fuser = M.Fuser(self.unet)
        self.table = M.token_table()
        self.ac = M.alphas_cumprod()
        self.n_samples = n_samples
        paths = lora_paths or {t: TR.lora_path(seed, t) for t in self.tasks}
        self.loras = {t: domerge_core.load_lora(paths[t]) for t in self.tasks}
        n_eval = n_eval or N_EVAL
        self.data: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
        for split, n in n_eval.items():
            self.data[split] = {}
            for t in self.tasks:
                d = S.concept_data(t, split, n, seed)
                g = torch.Generator().manual_seed(S.split_seed(split, seed, t) + 1)
                k = len(d["tok"])
                d["t"] = torch.tensor(EVAL_T).repeat_interleave(k)
                d["x"] = d["x"].repeat(len(EVAL_T), 1, 1, 1)
                d["tok"] = d["tok"].repeat(len(EVAL_T))
                d["region"] = d["region"].repeat(len(EVAL_T), 1, 1)
                d["noise"] = torch.randn(d["x"].shape, generator=g)
                self.data[split][t] = d
        self.subsets = self._subsets()
        self._ref: Dict[tuple, float] = {}
        self.n_evals = 0

    def _subsets(self) -> Dict[str, List[str]]:
        """T=2: the style + one concept; T=3: the style + two concepts (seeded draws); all."""
        rng = random.Random(4_000 + self.seed)
        concepts = [t for t in self.tasks if t != S.STYLE]
        out = {"all": list(self.tasks)}
        if S.STYLE in self.tasks and len(concepts) >= 2:
            pick = rng.sample(concepts, 2)
            out["T=2"] = [S.STYLE, pick[0]]
            out["T=3"] = [S.STYLE] + pick
        else:
            out["T=2"] = concepts[:2]
            out["T=3"] = concepts[:3]
        return out

    # ------------------------------------------------------------------------------------------
    def _loss(self, task: str, split: str) -> float:
        d = self.data[split][task]
        with torch.no_grad():
            return float(M.eps_loss(self.unet, self.table, d["x"], d["tok"], d["t"], d["noise"], self.ac,
                                     region=d["region"]))

    def losses(self, lora, tasks: Sequence[str], split: str) -> Dict[str, float]:
        self.fuser.fuse(lora)
        try:
            return {t: self._loss(t, split) for t in tasks}
        finally:
            self.fuser.unfuse()

    def ref_loss(self, which: str, task: str, split: str) -> float:
        k = (which, task, split)
        if k not in self._ref:
            self._ref[k] = self.losses(None if which == "base" else self.loras[task], [task], split)[task]
        return self._ref[k]

    def score(self, lora, tasks: Sequence[str], split: str) -> Dict[str, float]:
        """Normalized denoising gain per task."""
        self.n_evals += 1
        ls = self.losses(lora, tasks, split)
        out = {}
        for t in tasks:
            lb, lo = self.ref_loss("base", t, split), self.ref_loss("own", t, split)
            out[t] = (lb - ls[t]) / max(lb - lo, 1e-8)
        return out

    # ------------------------------------------------------------------------------------------
    def prompts(self, task: str) -> torch.Tensor:
        if task == S.STYLE:
            subj = [S.token_id(s) for s in S.BASE_SUBJECTS]
            return torch.tensor([subj[i % len(subj)] for i in range(self.n_samples)])
        return torch.full((self.n_samples,), S.token_id(task))

    def judge_samples(self, task: str, imgs: torch.Tensor) -> float:
        with torch.no_grad():
            shape_logits, styled_logits = self.judge(imgs)
        if task == S.STYLE:
            return float(styled_logits.softmax(-1)[:, 1].mean())
        return float(shape_logits.softmax(-1)[:, S.SHAPES.index(task)].mean())

    def sample(self, lora, task: str) -> torch.Tensor:
        self.fuser.fuse(lora)
        try:
            return M.sample(self.unet, self.table, self.prompts(task), seed=50_000 + self.seed, steps=SAMPLE_STEPS)
        finally:
            self.fuser.unfuse()

    def raw_sample_score(self, lora, task: str) -> float:
        return self.judge_samples(task, self.sample(lora, task))

    def ref_sample(self, which: str, task: str) -> float:
        k = ("sample", which, task)
        if k not in self._ref:
            self._ref[k] = self.raw_sample_score(None if which == "base" else self.loras[task], task)
        return self._ref[k]

    def extra_test(self, lora, tasks: Sequence[str]) -> Dict[str, Dict[str, float]]:
        """The sample metric: judge score of the merged model's pictures ÷ the own LoRA's."""
        out = {}
        for t in tasks:
            out[t] = self.raw_sample_score(lora, t) / max(self.ref_sample("own", t), 0.05)
        return {"sample": out}

    def references(self) -> Dict[str, Dict[str, float]]:
        """Absolute numbers behind the normalization (test): losses and judge scores."""
        return {t: {"loss_base": self.ref_loss("base", t, "test"), "loss_own": self.ref_loss("own", t, "test"),
                    "judge_base": self.ref_sample("base", t), "judge_own": self.ref_sample("own", t)}
                for t in self.tasks}
