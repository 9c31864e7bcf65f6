"""Shared fixtures: tiny offline diffusers pipelines (one per session) and random LoRA files for them.

torch runs on one thread: on the shared 2-core box two threads made the tiny UNet 50x slower.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:
        return False


HAS_DIFFUSERS = _has("diffusers") and _has("transformers") and _has("peft")
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="the [diffusers] extra is not installed")


@pytest.fixture(scope="session")
def sd1_pipe(tmp_path_factory):
    from domerge_core.testing import tiny
    return tiny.tiny_sd1(folder=str(tmp_path_factory.mktemp("tok_sd1")))


@pytest.fixture(scope="session")
def sdxl_pipe(tmp_path_factory):
    from domerge_core.testing import tiny
    return tiny.tiny_sdxl(folder=str(tmp_path_factory.mktemp("tok_sdxl")))


@pytest.fixture(scope="session")
def sd1_lora(sd1_pipe):
    """kohya target set with LoCon 3x3 convs; linear alpha/rank = 2/4, conv 1.5/3."""
    from domerge_core.testing import tiny
    return tiny.random_lora(sd1_pipe, rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5, seed=11)


@pytest.fixture(scope="session")
def sdxl_lora(sdxl_pipe):
    from domerge_core.testing import tiny
    return tiny.random_lora(sdxl_pipe, rank=4, alpha=2.0, conv_rank=2, conv_alpha=2.0, seed=12)


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory, sd1_lora, sdxl_lora):
    """The two random LoRAs written as fixture files in several layouts (by tiny's own writers)."""
    from domerge_core.testing import tiny
    d = tmp_path_factory.mktemp("lora_files")
    f = {
        "sd1_kohya": tiny.write_kohya(sd1_lora, str(d / "sd1_kohya.safetensors"),
                                      metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": "4",
                                                "ss_network_alpha": "2.0"}),
        "sd1_peft": tiny.write_peft(sd1_lora, str(d / "sd1_peft.safetensors")),
        "sd1_peft_meta": tiny.write_peft(sd1_lora, str(d / "sd1_peft_meta.safetensors"), scale="metadata"),
        "sdxl_kohya_sgm": tiny.write_kohya(sdxl_lora, str(d / "sdxl_kohya_sgm.safetensors"), sgm=True,
                                           metadata={"ss_base_model_version": "sdxl_base_v1-0"}),
        "sdxl_kohya_dm": tiny.write_kohya(sdxl_lora, str(d / "sdxl_kohya_dm.safetensors"), sgm=False),
        "sdxl_peft": tiny.write_peft(sdxl_lora, str(d / "sdxl_peft.safetensors")),
    }
    return f


@pytest.fixture(scope="session")
def ref_deltas():
    """canonical key -> dense float64 update, for a Lora (memoised per object)."""
    from domerge_core.testing import tiny
    cache = {}

    def get(lora):
        if id(lora) not in cache:
            cache[id(lora)] = dict(tiny.iter_deltas(lora))
        return cache[id(lora)]
    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float(((a - b).norm() / b.norm().clamp_min(1e-30)).detach())


def assert_same_deltas(lora, ref: dict, tol: float = 1e-5):
    """Every module of ``lora`` has the reference update (and the module sets agree)."""
    assert set(lora.modules) == set(ref), sorted(set(lora.modules) ^ set(ref))[:5]
    for m in lora:
        got = m.delta(torch.float64).reshape(ref[m.key].shape)
        assert rel_err(got, ref[m.key]) < tol, m.key


def run_cli(*args, cwd=None, timeout=120):
    """``python -m domerge_core ARGS`` -> CompletedProcess (text)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "domerge_core", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or REPO, env=env, timeout=timeout)
