"""``domerge inspect`` / ``domerge convert`` on good and bad files: exit code 2 and one line
``error: <file>: <reason>`` for bad input, and no output file left behind.

Most cases call ``cli.main(argv)`` in-process (the same code path as the console script); two go
through ``python -m domerge_core`` to check the real entry point.
"""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_same_deltas, run_cli
from domerge_core import cli
from domerge_core.formats import load_lora

NAME = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"


def _cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _bad_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    good = {f"{NAME}.lora_down.weight": torch.randn(2, 16, generator=g),
            f"{NAME}.lora_up.weight": torch.randn(16, 2, generator=g)}
    files = {}
    files["missing"] = str(tmp_path / "missing.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    files["empty"] = str(tmp_path / "empty.safetensors")
    save_file(good, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 40])
    files["truncated"] = str(tmp_path / "truncated.safetensors")
    (tmp_path / "random.safetensors").write_bytes(os.urandom(1000))
    files["random"] = str(tmp_path / "random.safetensors")
    (tmp_path / "model.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    files["pickle"] = str(tmp_path / "model.ckpt")
    save_file({f"{NAME}.lora_up.weight": good[f"{NAME}.lora_up.weight"]}, str(tmp_path / "uponly.safetensors"))
    files["up_without_down"] = str(tmp_path / "uponly.safetensors")
    save_file({f"{NAME}.lora_down.weight": torch.zeros(3, 16), f"{NAME}.lora_up.weight": torch.zeros(16, 2)},
              str(tmp_path / "shapes.safetensors"))
    files["shape_mismatch"] = str(tmp_path / "shapes.safetensors")
    nan = dict(good)
    nan[f"{NAME}.lora_down.weight"] = good[f"{NAME}.lora_down.weight"].clone()
    nan[f"{NAME}.lora_down.weight"][0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    files["nan"] = str(tmp_path / "nan.safetensors")
    save_file({f"{NAME}.hada_w1_a": torch.zeros(16, 2), f"{NAME}.hada_w1_b": torch.zeros(2, 16)},
              str(tmp_path / "loha.safetensors"))
    files["loha"] = str(tmp_path / "loha.safetensors")
    return files


REASONS = {"missing": "not found", "empty": "empty", "truncated": "truncated", "random": "not a safetensors",
           "pickle": "convert", "up_without_down": "no down factor", "shape_mismatch": "shape mismatch",
           "nan": "NaN", "loha": "LoHa"}


@pytest.mark.parametrize("case", sorted(REASONS))
def test_convert_bad_input_exit_2_one_line_no_output(tmp_path, capsys, case):
    files = _bad_files(tmp_path)
    out = tmp_path / "out" / "converted.safetensors"
    out.parent.mkdir()
    rc, _, err = _cli(capsys, "convert", files[case], "-o", out, "--format", "diffusers")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {files[case]}: "), lines[0]
    assert REASONS[case] in lines[0], lines[0]
    assert "Traceback" not in err
    assert os.listdir(out.parent) == []            # no output, no temp file


@pytest.mark.parametrize("case", ["empty", "pickle", "up_without_down", "shape_mismatch"])
def test_inspect_bad_input(tmp_path, capsys, case):
    files = _bad_files(tmp_path)
    rc, out, err = _cli(capsys, "inspect", files[case])
    assert rc == 2 and out == ""
    assert err.strip().startswith(f"error: {files[case]}: ") and len(err.strip().splitlines()) == 1


def test_sd15_sdxl_mix_is_refused(tmp_path, capsys, lora_files):
    rc, _, err = _cli(capsys, "inspect", lora_files["sd1_kohya"], lora_files["sdxl_kohya_sgm"])
    assert rc == 2
    line = err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: ")
    assert "sd1_kohya.safetensors" in line and "sdxl_kohya_sgm.safetensors" in line


def test_inspect_json(capsys, lora_files):
    rc, out, err = _cli(capsys, "inspect", "--json", lora_files["sdxl_kohya_sgm"])
    assert rc == 0, err
    d = json.loads(out)
    info = d["files"][0] if "files" in d else d
    assert info["format"] == "kohya" and info["base_model"] == "sdxl"
    assert info["modules"] == len(load_lora(lora_files["sdxl_kohya_sgm"]))
    assert info["ranks"]["histogram"] and info["dtype"] == "fp32" and info["parameters"] > 0


def test_convert_to_a_layout_the_family_cannot_load_is_refused(tmp_path, capsys, lora_files):
    """An SD1.5 LoRA in the PEFT layout would load as nothing in diffusers and ComfyUI: refused,
    naming the reason, and nothing is written (issue 13)."""
    out = tmp_path / "c.peft.safetensors"
    rc, _, err = _cli(capsys, "convert", lora_files["sd1_kohya"], "-o", out, "--format", "peft")
    assert rc == 2 and "peft" in err and not out.exists()


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_convert_round_trip(tmp_path, capsys, lora_files, sd1_lora, ref_deltas, fmt):
    out = tmp_path / f"c.{fmt}.safetensors"
    rc, _, err = _cli(capsys, "convert", lora_files["sd1_kohya"], "-o", out, "--format", fmt, "--dtype", "fp16")
    assert rc == 0, err
    back = load_lora(str(out))
    assert back.format == fmt and back.dtype == torch.float16
    assert_same_deltas(back, ref_deltas(sd1_lora), tol=2e-3)
    # existing output: refused without --overwrite, file untouched
    before = out.read_bytes()
    rc, _, err = _cli(capsys, "convert", lora_files["sd1_kohya"], "-o", out, "--format", fmt)
    assert rc == 2 and "overwrite" in err and out.read_bytes() == before
    rc, _, err = _cli(capsys, "convert", lora_files["sd1_kohya"], "-o", out, "--format", fmt, "--overwrite")
    assert rc == 0 and load_lora(str(out)).dtype == torch.float32


def test_convert_onto_its_input_is_refused(tmp_path, capsys, lora_files):
    src = tmp_path / "in.safetensors"
    src.write_bytes(open(lora_files["sd1_kohya"], "rb").read())
    before = src.read_bytes()
    rc, _, err = _cli(capsys, "convert", src, "-o", src, "--overwrite")
    assert rc == 2 and "input" in err and src.read_bytes() == before


def test_python_m_entry_point(tmp_path, lora_files):
    """The real ``python -m domerge_core`` process: one good and one bad call."""
    files = _bad_files(tmp_path)
    p = run_cli("inspect", lora_files["sd1_kohya"])
    assert p.returncode == 0, p.stderr
    assert "kohya" in p.stdout
    p = run_cli("convert", files["truncated"], "-o", tmp_path / "x.safetensors")
    assert p.returncode == 2
    assert p.stderr.strip() == p.stderr.strip().splitlines()[0]
    assert p.stderr.startswith(f"error: {files['truncated']}: ") and "Traceback" not in p.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_merge_to_a_layout_the_family_cannot_load_is_refused(tmp_path, capsys, lora_files):
    """``domerge merge --format peft`` on SD1.5 LoRAs wrote a file diffusers loads as a silent
    no-op: now refused before merging, naming the reason; nothing is written (issue 13)."""
    out = tmp_path / "m.safetensors"
    rc, _, err = _cli(capsys, "merge", lora_files["sd1_kohya"], lora_files["sd1_peft"], "-o", out,
                      "--format", "peft")
    assert rc == 2 and "peft" in err and not out.exists()


def test_convert_to_a_layout_the_family_cannot_load_is_refused(tmp_path, capsys, lora_files):
    out = tmp_path / "c.peft.safetensors"
    rc, _, err = _cli(capsys, "convert", lora_files["sd1_kohya"], "-o", out, "--format", "peft")
    assert rc == 2 and "peft" in err and not out.exists()
