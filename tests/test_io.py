"""Bad inputs give the right DomergeError naming the file (and key); writes are atomic and never
replace a file without overwrite; nothing is ever unpickled."""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from domerge_core.formats import safetensors as dio
from domerge_core import check_compatible
from domerge_core.errors import (DomergeError, IncompatibleLorasError, LoraFormatError, OutputExistsError,
                                 UnsupportedFormatError)
from domerge_core.formats import load_lora, load_state_dict, save_lora

G = torch.Generator().manual_seed(0)
NAME = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"


def _pair(out=16, inn=16, r=2):
    return {f"{NAME}.lora_down.weight": torch.randn(r, inn, generator=G),
            f"{NAME}.lora_up.weight": torch.randn(out, r, generator=G), f"{NAME}.alpha": torch.tensor(1.0)}


def _write(tmp_path, name, sd, metadata=None):
    p = str(tmp_path / name)
    save_file(sd, p, metadata=metadata)
    return p


def _raises(exc, path, fn=load_lora, key=None, words=()):
    with pytest.raises(exc) as e:
        fn(path)
    err = e.value
    assert err.file == path
    line = str(err)
    assert "\n" not in line and line.startswith(path)
    if key is not None:
        assert err.key == key and key in line
    for w in words:
        assert w in line, line
    return err


# --------------------------------------------------------------------------- unreadable files
def test_missing_file(tmp_path):
    _raises(LoraFormatError, str(tmp_path / "nope.safetensors"), words=("not found",))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    _raises(LoraFormatError, str(p), words=("empty",))


def test_truncated_file(tmp_path):
    p = _write(tmp_path, "t.safetensors", _pair(64, 64, 4))
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    _raises(LoraFormatError, p, words=("truncated",))
    with open(p, "wb") as f:
        f.write(data[:20])                  # inside the header
    _raises(LoraFormatError, p, words=("truncated",))


def test_random_bytes(tmp_path):
    p = tmp_path / "noise.safetensors"
    p.write_bytes(os.urandom(4096))
    _raises(LoraFormatError, str(p), words=("not a safetensors file",))
    q = tmp_path / "json_garbage.safetensors"
    q.write_bytes(struct.pack("<Q", 9) + b"not json!" + b"\0" * 16)
    _raises(LoraFormatError, str(q), words=("not JSON",))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".safetensors"])
def test_pickles_are_refused_without_unpickling(tmp_path, suffix, monkeypatch):
    class Bomb:
        def __reduce__(self):
            return (os.system, ("echo unpickled > /dev/null",))
    p = tmp_path / f"evil{suffix}"
    p.write_bytes(pickle.dumps({"x": Bomb()}, protocol=4))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    err = _raises(LoraFormatError, str(p))
    assert "safetensors" in str(err)
    if suffix != ".safetensors":
        assert "convert" in str(err)


def test_torch_zip_checkpoint_is_refused(tmp_path):
    p = tmp_path / "model.safetensors"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    _raises(LoraFormatError, str(p), words=("zip", "convert"))


def test_folder_is_refused(tmp_path):
    _raises(LoraFormatError, str(tmp_path), words=("folder",))


# --------------------------------------------------------------------------- broken LoRAs
def test_up_without_down(tmp_path):
    sd = _pair()
    del sd[f"{NAME}.lora_down.weight"]
    p = _write(tmp_path, "updown.safetensors", sd)
    _raises(LoraFormatError, p, key=f"{NAME}.lora_up.weight", words=("no down factor",))


def test_down_without_up(tmp_path):
    sd = _pair()
    del sd[f"{NAME}.lora_up.weight"]
    p = _write(tmp_path, "downonly.safetensors", sd)
    _raises(LoraFormatError, p, key=f"{NAME}.lora_down.weight")


def test_shape_inconsistent_up_down(tmp_path):
    sd = _pair()
    sd[f"{NAME}.lora_up.weight"] = torch.randn(16, 3, generator=G)     # rank 3 vs down rank 2
    p = _write(tmp_path, "shapes.safetensors", sd)
    _raises(LoraFormatError, p, key=f"{NAME}.lora_up.weight", words=("[16, 3]", "[2, 16]"))


def test_alpha_without_factors(tmp_path):
    sd = _pair()
    sd["lora_unet_other_module.alpha"] = torch.tensor(1.0)
    p = _write(tmp_path, "alpha.safetensors", sd)
    _raises(LoraFormatError, p, key="lora_unet_other_module.alpha")


def test_non_float_factor(tmp_path):
    sd = _pair()
    sd[f"{NAME}.lora_down.weight"] = torch.ones(2, 16, dtype=torch.int32)
    p = _write(tmp_path, "int.safetensors", sd)
    _raises(LoraFormatError, p, key=f"{NAME}.lora_down.weight", words=("dtype",))


def test_nan_in_a_factor(tmp_path):
    sd = _pair()
    sd[f"{NAME}.lora_up.weight"][3, 1] = float("nan")
    p = _write(tmp_path, "nan.safetensors", sd)
    lora = load_lora(p)                 # header is fine; the values are checked when read
    with pytest.raises(LoraFormatError) as e:
        next(iter(lora)).factors()
    assert e.value.file == p and e.value.key == f"{NAME}.lora_up.weight" and "NaN" in str(e.value)
    with pytest.raises(LoraFormatError):          # and nothing is written
        save_lora(lora, str(tmp_path / "out.safetensors"))
    assert not os.path.exists(tmp_path / "out.safetensors")
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_no_lora_keys(tmp_path):
    p = _write(tmp_path, "model.safetensors", {"model.diffusion_model.conv_in.weight": torch.zeros(4, 4)})
    _raises(LoraFormatError, p, key="model.diffusion_model.conv_in.weight", words=("not a LoRA factor",))


# --------------------------------------------------------------------------- unsupported adapter types
UNSUPPORTED = {
    # LoHa / LoKr are read (tests/test_formats_lycoris.py)
    "OFT": {f"{NAME}.oft_blocks": (4, 4, 4), f"{NAME}.alpha": ()},
    "DoRA": {f"{NAME}.lora_down.weight": (2, 16), f"{NAME}.lora_up.weight": (16, 2), f"{NAME}.dora_scale": (16, 1)},
    "full bias difference": {f"{NAME}.diff_b": (16,)},
}


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
def test_unsupported_formats_name_format_and_first_key(tmp_path, kind):
    sd = {k: torch.zeros(s) for k, s in UNSUPPORTED[kind].items()}
    p = _write(tmp_path, f"{kind.split()[0]}.safetensors", sd)
    first = next(k for k in sd if not k.endswith((".alpha", ".lora_down.weight", ".lora_up.weight")))
    err = _raises(UnsupportedFormatError, p, key=first, words=(kind,))
    assert "format found" in str(err)


def test_peft_dora_is_unsupported():
    sd = {"unet.a.lora_A.weight": torch.zeros(2, 4), "unet.a.lora_B.weight": torch.zeros(4, 2),
          "unet.a.lora_magnitude_vector": torch.zeros(4)}
    with pytest.raises(UnsupportedFormatError) as e:
        load_state_dict(sd, source="dora.safetensors")
    assert e.value.file == "dora.safetensors" and "DoRA" in str(e.value)


# --------------------------------------------------------------------------- incompatible inputs
def test_sd15_and_sdxl_are_refused_naming_both_files_and_shapes(tmp_path):
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sd15 = {f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(640, 4)}
    sdxl = {f"{key}.lora_down.weight": torch.zeros(4, 2048), f"{key}.lora_up.weight": torch.zeros(640, 4)}
    a = load_lora(_write(tmp_path, "style_sd15.safetensors", sd15))
    b = load_lora(_write(tmp_path, "char_sdxl.safetensors", sdxl))
    with pytest.raises(IncompatibleLorasError) as e:
        check_compatible([a, b])
    msg = str(e.value)
    for w in ("style_sd15.safetensors", "char_sdxl.safetensors", "attn2.to_k", "640x768", "640x2048"):
        assert w in msg, msg
    assert "\n" not in msg


def test_tiny_sd1_and_sdxl_loras_are_refused(lora_files):
    with pytest.raises(IncompatibleLorasError):
        check_compatible([load_lora(lora_files["sd1_kohya"]), load_lora(lora_files["sdxl_kohya_sgm"])])
    check_compatible([load_lora(lora_files["sd1_kohya"]), load_lora(lora_files["sd1_peft"])])


def test_unet_only_and_te_only_loras_are_compatible(tmp_path):
    a = load_state_dict(_pair(), source="a")
    b = load_state_dict({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
                         "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)},
                        source="b")
    check_compatible([a, b])


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_refuses_existing_and_overwrites_on_request(tmp_path):
    p = tmp_path / "out.bin"
    dio.atomic_write(str(p), lambda f: f.write(b"one"))
    with pytest.raises(OutputExistsError) as e:
        dio.atomic_write(str(p), lambda f: f.write(b"two"))
    assert e.value.file == str(p) and "overwrite" in str(e.value)
    assert p.read_bytes() == b"one"
    dio.atomic_write(str(p), lambda f: f.write(b"two"), overwrite=True)
    assert p.read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_cleans_up_on_failure(tmp_path, exc):
    p = tmp_path / "out.safetensors"
    p.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise exc("stop")
    with pytest.raises(exc):
        dio.atomic_write(str(p), boom, overwrite=True)
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.safetensors"]

    def boom_path(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise exc("stop")
    with pytest.raises(exc):
        dio.atomic_write(str(tmp_path / "new.safetensors"), boom_path, pass_path=True)
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_save_lora_refuses_existing_output_and_input_path(tmp_path, lora_files):
    lora = load_lora(lora_files["sd1_kohya"])
    with pytest.raises(OutputExistsError):
        save_lora(lora, lora_files["sd1_kohya"], overwrite=True)        # never over its own input
    other = str(tmp_path / "other.safetensors")
    with pytest.raises(OutputExistsError):
        save_lora(lora, other, inputs=[other], overwrite=True)
    out = str(tmp_path / "out.safetensors")
    save_lora(lora, out)
    before = open(out, "rb").read()
    with pytest.raises(OutputExistsError):
        save_lora(lora, out, format="diffusers")
    assert open(out, "rb").read() == before
    save_lora(lora, out, format="diffusers", overwrite=True)
    assert load_lora(out).format == "diffusers"


def test_missing_output_folder(tmp_path, lora_files):
    with pytest.raises(DomergeError):
        save_lora(load_lora(lora_files["sd1_kohya"]), str(tmp_path / "no" / "such" / "out.safetensors"))


def test_sha256_streamed(tmp_path):
    import hashlib
    p = tmp_path / "blob"
    data = os.urandom(3 * 1024 * 1024 + 17)
    p.write_bytes(data)
    assert dio.sha256_file(str(p), chunk=65536) == hashlib.sha256(data).hexdigest()
    assert dio.sha256_cached(str(p)) == hashlib.sha256(data).hexdigest()


def test_header_reads_metadata_without_data(tmp_path):
    p = _write(tmp_path, "m.safetensors", _pair(), metadata={"ss_network_dim": "2", "x": json.dumps({"a": 1})})
    h = dio.read_header(p)
    assert h.metadata["ss_network_dim"] == "2"
    assert h.tensors[f"{NAME}.lora_up.weight"].shape == (16, 2)


@pytest.mark.parametrize("alpha", [0.0, -2.0, float("nan"), 1e20])
def test_bad_alpha_is_refused(tmp_path, alpha):
    sd = _pair()
    sd[f"{NAME}.alpha"] = torch.tensor(alpha)
    p = _write(tmp_path, "alpha.safetensors", sd)
    _raises(LoraFormatError, p, key=f"{NAME}.alpha", words=("alpha",))


def test_rank_larger_than_the_layer_is_refused(tmp_path):
    p = _write(tmp_path, "rank.safetensors", _pair(out=16, inn=16, r=20))
    _raises(LoraFormatError, p, key=f"{NAME}.lora_down.weight", words=("rank 20",))


def test_same_file_twice_is_refused(tmp_path):
    p = _write(tmp_path, "one.safetensors", _pair())
    link = tmp_path / "link.safetensors"
    os.symlink(p, link)
    for pair in ([p, p], [p, str(link)]):
        with pytest.raises(IncompatibleLorasError) as e:
            check_compatible([load_lora(x) for x in pair])
        assert "same file" in str(e.value)


def test_failed_write_is_a_domerge_error_and_leaves_nothing(tmp_path):
    def fail(tmp):
        raise OSError(28, "No space left on device")
    with pytest.raises(DomergeError) as e:
        dio.atomic_write(str(tmp_path / "o.safetensors"), fail, pass_path=True)
    assert e.value.file == str(tmp_path / "o.safetensors") and "No space left" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_fp16_overflow_is_refused_not_written(tmp_path):
    sd = _pair()
    sd[f"{NAME}.lora_up.weight"] = sd[f"{NAME}.lora_up.weight"] * 1e5
    lora = load_lora(_write(tmp_path, "big.safetensors", sd))
    with pytest.raises(LoraFormatError) as e:
        save_lora(lora, str(tmp_path / "o.safetensors"), dtype=torch.float16)
    assert "overflow" in str(e.value)
    assert not os.path.exists(tmp_path / "o.safetensors")
