"""output_metadata (carried keys, domerge record with sha256) and describe (header only)."""
from __future__ import annotations

import hashlib
import json

import torch

from domerge_core.testing import tiny
from domerge_core.formats import load_lora, save_lora
from domerge_core.formats.describe import describe, format_description
from domerge_core.metadata import output_metadata


def test_output_metadata_carries_agreeing_keys_and_records_inputs(tmp_path, sd1_pipe):
    a = tiny.write_kohya(tiny.random_lora(sd1_pipe, rank=4, seed=1), str(tmp_path / "a.safetensors"),
                         metadata={"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora",
                                   "modelspec.title": "Style A", "ss_tag_frequency": "{}", "ss_seed": "1"})
    b = tiny.write_kohya(tiny.random_lora(sd1_pipe, rank=8, seed=2), str(tmp_path / "b.safetensors"),
                         metadata={"ss_base_model_version": "sd_v1", "modelspec.architecture": "other/lora"})
    la, lb = load_lora(a), load_lora(b)
    md = output_metadata([la, lb], weights=[0.8, 1.0], method="do", params={"lam": 0.5, "density": None},
                         rank_info={4, 8})
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_base_model_version"] == "sd_v1"
    assert "modelspec.architecture" not in md              # the inputs disagree
    assert "ss_tag_frequency" not in md and "ss_seed" not in md
    assert md["ss_network_dim"] == md["ss_network_alpha"] == "Dynamic"
    assert md["modelspec.merged_from"] == "Style A, b"
    rec = json.loads(md["domerge"])
    assert rec["method"] == "do" and rec["params"] == {"lam": 0.5, "density": None} and rec["version"]
    assert [i["file"] for i in rec["inputs"]] == ["a.safetensors", "b.safetensors"]
    assert [i["weight"] for i in rec["inputs"]] == [0.8, 1.0]
    assert rec["inputs"][0]["sha256"] == hashlib.sha256(open(a, "rb").read()).hexdigest()
    md1 = output_metadata([la], weights=[1], method="ta", params={}, rank_info=16)
    assert md1["ss_network_dim"] == "16" and md1["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_metadata_survives_the_writer(tmp_path, lora_files):
    lora = load_lora(lora_files["sd1_kohya"])
    md = output_metadata([lora], weights=[1.0], method="ta", params={"x": 1}, rank_info=lora)
    out = save_lora(lora, str(tmp_path / "o.safetensors"), metadata=md)
    back = load_lora(out)
    assert json.loads(back.metadata["domerge"])["method"] == "ta"
    assert back.metadata["ss_base_model_version"] == "sd_v1"


def test_describe_reads_header_only(lora_files, monkeypatch):
    from domerge_core.formats import safetensors as dio
    orig = dio.LazyFile.get

    def only_alphas(self, key):
        assert key.endswith(".alpha"), f"describe read factor data: {key}"
        return orig(self, key)
    monkeypatch.setattr(dio.LazyFile, "get", only_alphas)
    d = describe(lora_files["sdxl_kohya_sgm"])
    assert d["format"] == "kohya" and d["base_model"] == "sdxl"
    assert d["modules"] == sum(d["components"].values())
    assert set(d["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    assert d["ranks"]["histogram"] == {"2": d["kinds"]["conv"], "4": d["modules"] - d["kinds"]["conv"]}
    assert d["dtype"] == "fp32" and d["parameters"] > 0 and d["file_size"] > 0
    assert d["layout"]["unet_names"] == "sgm"
    json.dumps(d)
    text = format_description(d)
    assert "sdxl" in text and str(d["modules"]) in text


def test_describe_sd1_locon(lora_files):
    d = describe(load_lora(lora_files["sd1_kohya"]))
    assert d["kinds"]["conv"] > 0 and d["kinds"]["conv1x1"] > 0 and d["kinds"]["linear"] > 0
    assert d["ranks"]["min"] == 3 and d["ranks"]["max"] == 4
    assert d["alphas"] == {"1.5": d["kinds"]["conv"], "2": d["modules"] - d["kinds"]["conv"]}
    assert d["scales"] == {"0.5": d["modules"]}


def test_describe_path_equals_describe_lora_and_needs_no_torch(lora_files, tmp_path):
    import subprocess
    import sys
    from conftest import REPO
    for name in ("sd1_kohya", "sdxl_kohya_sgm", "sd1_peft_meta"):
        a, b = describe(lora_files[name]), describe(load_lora(lora_files[name]))
        assert a == b, name
    code = ("import sys, json; from domerge_core.formats.describe import describe; "
            f"d = describe({lora_files['sdxl_kohya_sgm']!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(d['modules'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) == describe(lora_files["sdxl_kohya_sgm"])["modules"]


def test_inspect_and_load_resolve_a_peft_folder_by_one_rule(tmp_path):
    """A folder holding one adapter file is that file for ``load_lora`` and ``describe`` alike; a
    folder with two is refused by both, with the same message (one rule: formats.safetensors)."""
    import shutil

    import pytest
    from domerge_core import LoraFormatError, describe, load_lora
    from domerge_core.testing import tiny as T

    lora = T.random_lora(T.tiny_sd1(folder=str(tmp_path / "pipe")), rank=2, seed=1)
    one = tmp_path / "one"
    one.mkdir()
    T.write_peft(lora, str(one / "adapter_model.safetensors"))
    assert describe(str(one))["modules"] == len(load_lora(str(one)))
    two = tmp_path / "two"
    shutil.copytree(one, two)
    shutil.copy(one / "adapter_model.safetensors", two / "pytorch_lora_weights.safetensors")
    msgs = []
    for fn in (load_lora, describe):
        with pytest.raises(LoraFormatError) as e:
            fn(str(two))
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "several" in msgs[0]
