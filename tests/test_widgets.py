"""Notebook toolkit (`domerge_widgets`) driven through ipywidgets' own Python objects.

Real parts only: LoRA files written as safetensors for a tiny diffusers pipeline, the real core
merge, a real diffusers pipeline for the preview. Merges run with ``background=False`` (on the
test's thread) unless a test is about the worker thread, so every assertion is deterministic.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

import ipywidgets as W  # noqa: E402

import domerge_core as core  # noqa: E402
from domerge_core.testing import tiny  # noqa: E402
from domerge_widgets import Debouncer, MergePanel, PreviewPanel  # noqa: E402


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny.tiny_sd1(folder=str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def lora_dir(pipe, tmp_path_factory):
    """Three LoRAs of different rank/alpha/magnitude (two kohya, one PEFT) for the tiny SD1 pipeline."""
    d = tmp_path_factory.mktemp("loras")
    tiny.write_kohya(tiny.random_lora(pipe, rank=4, alpha=4, seed=1, std=0.5), str(d / "a_style.safetensors"))
    tiny.write_kohya(tiny.random_lora(pipe, rank=8, alpha=4, seed=2, std=0.8), str(d / "b_subject.safetensors"))
    tiny.write_peft(tiny.random_lora(pipe, rank=2, alpha=1, seed=3, std=0.3, targets="attn"),
                    str(d / "c_detail.safetensors"))
    return d


def _panel(lora_dir, **kw):
    kw.setdefault("background", False)
    kw.setdefault("debounce", 60.0)    # a debounce that never fires by itself: tests flush it
    return MergePanel(folder=str(lora_dir), output_dir=str(lora_dir), **kw)


def _deltas(lora):
    return {m.key: m.delta(torch.float64) for m in lora}


def _assert_same_update(a, b, rtol=1e-5):
    da, db = _deltas(a), _deltas(b)
    assert set(da) == set(db)
    for k in da:
        scale = max(db[k].norm().item(), 1e-12)
        assert (da[k] - db[k]).norm().item() <= rtol * scale, k


# ------------------------------------------------------------------------------------------------
# debounce
# ------------------------------------------------------------------------------------------------
def test_debouncer_collapses_triggers_and_flushes():
    calls = []
    d = Debouncer(lambda: calls.append(1), wait=60.0)
    for _ in range(5):
        d.trigger()
    assert d.pending and calls == []
    assert d.flush() is True
    assert calls == [1] and not d.pending
    assert d.flush() is False
    d.trigger()
    d.cancel()
    assert not d.pending and calls == [1]


def test_debouncer_fires_once_after_quiet_period(monkeypatch):
    """Only the last of several triggers runs, even when the earlier timers fire anyway (a cancel
    that comes too late): checked with timers fired by hand, so no timing is involved. Then one
    real trigger runs on the timer's thread."""
    import domerge_widgets.debounce as dmod

    timers = []

    class HandTimer:
        def __init__(self, wait, fn, args=()):
            self.wait, self.fn, self.args, self.daemon = wait, fn, args, False
            timers.append(self)

        def start(self):
            pass

        def cancel(self):
            pass

    calls = []
    monkeypatch.setattr(dmod.threading, "Timer", HandTimer)
    d = Debouncer(lambda: calls.append(1), wait=0.05)
    for _ in range(4):
        d.trigger()
    assert len(timers) == 4 and all(t.wait == 0.05 for t in timers)
    for t in timers[:-1]:                 # the superseded timers fire anyway: nothing runs
        t.fn(*t.args)
    assert calls == [] and d.pending
    timers[-1].fn(*timers[-1].args)       # the newest one runs the function, once
    assert calls == [1] and not d.pending
    monkeypatch.undo()

    fired = threading.Event()
    d = Debouncer(lambda: fired.set(), wait=0.01)
    d.trigger()
    assert fired.wait(60.0) and d.calls == 1


# ------------------------------------------------------------------------------------------------
# panel construction from the core
# ------------------------------------------------------------------------------------------------
def test_rows_and_method_controls_come_from_the_core(lora_dir):
    p = _panel(lora_dir)
    assert [r.label for r in p.rows] == ["a_style.safetensors", "b_subject.safetensors", "c_detail.safetensors"]
    assert all(r.error is None and r.enabled.value for r in p.rows)
    assert "rank 8" in p.rows[1].info.value and "rank 2" in p.rows[2].info.value
    assert [v for _, v in p.method.options] == [s.name for s in core.list_methods()]
    for spec in core.list_methods():
        p.method.value = spec.name
        params = spec.all_params()
        assert list(p.param_widgets) == [q.name for q in params]
        assert p.params() == spec.defaults()
        for q in params:
            w = p.param_widgets[q.name]
            if q.type == "bool":
                assert isinstance(w, W.Checkbox)
            elif q.type == "choice":
                assert isinstance(w, W.Dropdown) and tuple(w.options) == tuple(q.choices)
            elif q.min is not None and q.max is not None:
                assert (w.min, w.max) == (q.min, q.max)
        # decouple / orthogonalize are top-level switches, everything else is under "Advanced"
        top = {w.description for w in p.switches.children}
        assert top == {q.label or q.name for q in params if q.name in ("decouple", "orthogonalize") and q.type == "bool"}
        assert len(p.switches.children) + len(p.advanced_box.children) == len(params)


def test_bad_files_show_a_message_not_a_traceback(lora_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(300))
    missing = tmp_path / "missing.safetensors"
    good = lora_dir / "a_style.safetensors"
    p = MergePanel(loras=[str(good), str(junk), str(missing)], background=False)
    assert p.rows[0].error is None
    for r, name in ((p.rows[1], "junk.safetensors"), (p.rows[2], "missing.safetensors")):
        assert r.error and name in r.error
        assert r.enabled.value is False and r.enabled.disabled and r.strength.disabled
        assert name in r.info.value and "Traceback" not in r.info.value
    p.merge_button.click()           # the good one still merges
    assert p.last_error is None and p.result is not None and len(p.result.inputs) == 1


# ------------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ta", "do"])
def test_merge_button_equals_core_call(lora_dir, method):
    p = _panel(lora_dir, method=method)
    p.rows[0].strength.value = 0.75
    p.rows[1].strength.value = -0.5
    p.rows[2].enabled.value = False
    p.merge_button.click()
    assert p.last_error is None, p.last_error
    kw = p.merge_kwargs()
    assert kw["weights"] == [0.75, -0.5] and len(kw["inputs"]) == 2 and kw["method"] == method
    direct = core.merge(**kw)
    _assert_same_update(p.result.lora, direct.lora)
    assert p.result.weights == direct.weights and p.result.params == direct.params
    assert p.progress.value == p.progress.max
    assert "merged 2 LoRA" in p.status.value
    assert p.table.value.count("<tr>") >= 3                       # header + one row per LoRA


def test_rank_and_params_reach_the_core(lora_dir):
    p = _panel(lora_dir, method="ta")
    p.rank.value = 3
    p.merge_button.click()
    assert p.last_error is None, p.last_error
    assert max(m.rank for m in p.result.lora) <= 3
    _assert_same_update(p.result.lora, core.merge(**p.merge_kwargs()).lora)
    assert "truncation" in p.plot_images


def test_plots_after_do_merge(lora_dir):
    p = _panel(lora_dir, method="do")
    p.merge_button.click()
    assert p.last_error is None, p.last_error
    assert {"block_norms", "cosine"} <= set(p.plot_images)
    for img in p.plot_images.values():
        assert bytes(img.value[:8]) == b"\x89PNG\r\n\x1a\n" and len(img.value) > 2000
    assert list(p.plots.children) == list(p.plot_images.values())


def test_merge_on_worker_thread(lora_dir):
    p = _panel(lora_dir, method="ta", background=True)
    seen_threads = set()
    p.on_progress.append(lambda d, t, s: seen_threads.add(threading.current_thread().name))
    p.merge_button.click()
    assert p.wait(120)
    assert p.last_error is None and p.result is not None
    assert seen_threads == {"domerge-merge"}
    assert not p.busy and p.merge_button.disabled is False and p.cancel_button.disabled is True


def test_newer_request_supersedes_running_merge(lora_dir):
    """A live request made while a merge runs cancels it; the worker then runs the newer one."""
    p = _panel(lora_dir, method="ta", background=True)
    done = []

    def hook(d, t, s):
        if not done:
            done.append(1)
            p.rows[0].strength.value = 0.3   # marks stale
            p.merge()                        # queued; the running merge stops at its next report

    p.on_progress.append(hook)
    p.merge()
    assert p.wait(120)
    assert p.merges == 1 and p.result.weights[0] == pytest.approx(0.3)
    assert not p.is_stale


def test_cancel_keeps_previous_result(lora_dir):
    p = _panel(lora_dir, method="ta")
    p.merge_button.click()
    first = p.result
    p.rows[0].strength.value = 0.1
    p.on_progress.append(lambda d, t, s: p.cancel_button.click())
    assert p.cancel_button.disabled is True
    p.merge_button.click()
    assert p.result is first and p.merges == 1
    assert "cancelled" in p.status.value and "Traceback" not in p.status.value
    assert p.is_stale and "stale" in p.stale.value
    p.on_progress.clear()
    p.merge_button.click()
    assert p.result is not first and not p.is_stale


def test_core_error_shows_in_panel(lora_dir, tmp_path):
    """A LoRA whose module has another shape than the same module in the others (a LoRA for
    another base model) cannot be merged: the core's error is a message in the panel."""
    key = next(m.key for m in core.load_lora(str(lora_dir / "a_style.safetensors")) if m.kind == "linear")
    odd = core.Lora(modules={key: core.LoraModule.from_tensors(key, torch.randn(7, 2), torch.randn(2, 5))},
                    format="kohya")
    odd_file = tmp_path / "other_model.safetensors"
    tiny.write_kohya(odd, str(odd_file))
    p = MergePanel(loras=[str(lora_dir / "a_style.safetensors"), str(odd_file)], background=False, method="ta")
    assert all(r.error is None for r in p.rows)      # each file alone is fine
    p.merge_button.click()
    assert p.result is None
    assert p.last_error and "other_model.safetensors" in p.last_error
    assert "Traceback" not in p.status.value and "other_model.safetensors" in p.status.value


def test_no_lora_enabled_is_a_message(lora_dir):
    p = _panel(lora_dir)
    for r in p.rows:
        r.enabled.value = False
    p.merge_button.click()
    assert p.result is None and "no LoRA enabled" in p.last_error


# ------------------------------------------------------------------------------------------------
# stale state and live mode
# ------------------------------------------------------------------------------------------------
def test_stale_tracks_controls(lora_dir):
    p = _panel(lora_dir, method="ta")
    assert p.is_stale and "no result" in p.stale.value
    p.merge_button.click()
    assert not p.is_stale and "up to date" in p.stale.value
    p.rows[1].strength.value = 0.4
    assert p.is_stale and "stale" in p.stale.value
    p.rows[1].strength.value = 1.0
    assert not p.is_stale                      # back to what was merged
    p.energy.value = 0.9
    assert p.is_stale
    p.energy.value = 0.0
    p.method.value = "do"
    assert p.is_stale


def test_live_mode_debounces_strength_moves(lora_dir):
    p = _panel(lora_dir, method="do", live=True)
    p.merge_button.click()
    assert p.merges == 1
    for v in (0.9, 0.7, 0.5, 0.3):            # a drag: many value changes
        p.rows[0].strength.value = v
    assert p.debouncer.pending and p.merges == 1 and p.is_stale
    p.debouncer.flush()
    assert p.merges == 2 and not p.is_stale and p.result.weights[0] == pytest.approx(0.3)
    # the live result is the same as a fresh core call with the same arguments (cache is exact)
    _assert_same_update(p.result.lora, core.merge(**p.merge_kwargs()).lora, rtol=1e-4)


def test_live_mode_off_or_expensive_param_only_marks_stale(lora_dir):
    p = _panel(lora_dir, method="do", live=False)
    p.merge_button.click()
    p.rows[0].strength.value = 0.5
    assert not p.debouncer.pending and p.is_stale
    p.live.value = True
    p.rows[0].strength.value = 1.0
    p.debouncer.flush()
    assert not p.is_stale
    own = {q.name for q in core.get_method("do").params}
    plugin_numeric = [q for q in core.get_method("do").all_params() if q.name not in own and q.type in ("int", "float")]
    if plugin_numeric:                        # e.g. orthogonalization steps: no automatic re-merge
        q = plugin_numeric[0]
        w = p.param_widgets[q.name]
        w.value = w.value + (q.step or 1) if q.max is None or w.value + (q.step or 1) <= q.max else w.value - (q.step or 1)
        assert p.is_stale and not p.debouncer.pending


def test_live_mode_fires_by_itself(lora_dir):
    p = _panel(lora_dir, method="ta", live=True, debounce=0.05)
    p.merge_button.click()
    p.rows[2].strength.value = 0.6
    deadline = time.monotonic() + 60
    while p.merges < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    p.wait(60)
    assert p.merges == 2 and p.result.weights[2] == pytest.approx(0.6)


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------
def test_save_refuses_a_layout_that_would_load_as_nothing(lora_dir, tmp_path):
    """peft names (base_model.model.…) load in neither ComfyUI nor diffusers for an SD LoRA: the
    panel refuses that format with the reason instead of writing a file that does nothing."""
    p = MergePanel(folder=str(lora_dir), output_dir=str(tmp_path), background=False, method="ta")
    p.merge_button.click()
    p.save_name.value = "out.safetensors"
    p.save_format.value = "peft"
    p.save_button.click()
    assert p.last_error and "format 'peft'" in p.last_error and "kohya" in p.last_error
    assert os.listdir(tmp_path) == []
    p.save_format.value = "diffusers"
    p.save_button.click()
    assert p.last_error is None and (tmp_path / "out.safetensors").is_file()


def test_save_refuses_overwrite_and_reports_it(lora_dir, tmp_path):
    p = MergePanel(folder=str(lora_dir), output_dir=str(tmp_path), background=False, method="ta")
    p.save_button.click()
    assert "merge first" in p.last_error
    p.merge_button.click()
    p.save_name.value = "out.safetensors"
    p.save_button.click()
    out = tmp_path / "out.safetensors"
    assert p.last_error is None and out.is_file() and "saved" in p.status.value
    before = out.read_bytes()
    p.rows[0].strength.value = 0.2
    p.merge_button.click()
    p.save_button.click()
    assert p.last_error and "out.safetensors" in p.last_error and "Traceback" not in p.status.value
    assert out.read_bytes() == before                         # not replaced
    p.overwrite.value = True
    p.save_button.click()
    assert p.last_error is None and out.read_bytes() != before
    _assert_same_update(core.load_lora(str(out)), p.result.lora, rtol=1e-5)
    assert [f for f in os.listdir(tmp_path) if f != "out.safetensors"] == []   # no temp files left


# ------------------------------------------------------------------------------------------------
# preview with diffusers
# ------------------------------------------------------------------------------------------------
def test_preview_grid_and_pipeline_restored(pipe, lora_dir):
    p = _panel(lora_dir, method="ta")
    p.rows[1].strength.value = 0.5
    pv = PreviewPanel(pipe, p, steps=2, size=64, background=False)
    pv.render_button.click()
    assert "merge first" in pv.last_error
    p.merge_button.click()
    pv.render_button.click()
    assert pv.last_error is None, pv.last_error
    keys = list(pv.images)
    assert keys[0] == "base" and len(keys) == 1 + 3 + 2
    assert keys[-2].startswith("stacked") and keys[-1].startswith("merged")
    base, stacked, merged = pv.images["base"], pv.images[keys[-2]], pv.images[keys[-1]]
    assert np.abs(stacked - base).max() > 1e-2                 # the LoRAs do something
    # task arithmetic at full rank IS plain stacking: the pictures agree
    assert np.abs(merged - stacked).max() < 2e-3
    for k in keys[1:4]:
        assert np.abs(pv.images[k] - base).max() > 1e-3
    assert bytes(pv.grid.value[:8]) == b"\x89PNG\r\n\x1a\n"
    # the pipeline is left exactly as it was
    assert not any(pipe.get_list_adapters().values())
    assert np.array_equal(pv.generate(), base)


def test_preview_refuses_pipeline_with_adapters(pipe, lora_dir):
    p = _panel(lora_dir, method="ta")
    p.merge_button.click()
    pipe.load_lora_weights(str(lora_dir / "a_style.safetensors"), adapter_name="user")
    try:
        pv = PreviewPanel(pipe, p, steps=1, size=64, background=False)
        pv.render()
        assert "already holds LoRA adapters" in pv.last_error and "user" in pv.last_error
        assert pipe.get_list_adapters()["unet"] == ["user"]
    finally:
        pipe.unload_lora_weights()


# ------------------------------------------------------------------------------------------------
# inputs that need the base model (DoRA): base=pipe, or the preview's pipeline
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dora_dir(pipe, tmp_path_factory):
    """A kohya DoRA (``dora_scale``) and a PEFT DoRA (``lora_magnitude_vector``, diffusers'
    save_lora_weights) for the tiny SD1 UNet, and the UNet as a diffusers component file (``--base``)."""
    from safetensors.torch import save_file
    from test_formats_peft_base import _diffusers_dora

    d = tmp_path_factory.mktemp("dora")
    g = torch.Generator().manual_seed(7)
    sd = {}
    for path in ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                 "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                 "down_blocks.1.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1"):
        m = pipe.unet.get_submodule(path)
        name = "lora_unet_" + path.replace(".", "_")
        w = m.weight
        sd[f"{name}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * 0.2
        sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 4, *[1] * (w.dim() - 2), generator=g) * 0.2
        sd[f"{name}.alpha"] = torch.tensor(2.0)
        sd[f"{name}.dora_scale"] = torch.rand(1, w.shape[1], *[1] * (w.dim() - 2), generator=g) + 0.5
    save_file(sd, str(d / "kohya_dora.safetensors"))
    _diffusers_dora(pipe, d / "peft", text_encoder=False)
    os.replace(d / "peft" / "pytorch_lora_weights.safetensors", d / "peft_dora.safetensors")
    os.rmdir(d / "peft")
    pipe.unet.save_pretrained(str(d / "unet"))            # diffusion_pytorch_model.safetensors
    return d


def test_panel_reads_dora_against_the_pipeline_like_the_cli_base(pipe, dora_dir, tmp_path):
    from conftest import run_cli

    files = [str(dora_dir / "kohya_dora.safetensors"), str(dora_dir / "peft_dora.safetensors")]
    # no base: both rows show the reader's refusal, naming the file and asking for a base
    bare = MergePanel(loras=files, background=False, debounce=60.0, output_dir=str(tmp_path), method="ta")
    for r, f in zip(bare.rows, files):
        assert r.lora is None and r.enabled.disabled and f in r.error and "base" in r.error
        assert ("dora_scale" if "kohya" in f else "lora_magnitude_vector") in r.error
    bare.merge_button.click()
    assert "no LoRA enabled" in bare.last_error
    # a PreviewPanel gives the panel its pipeline: the rows load
    PreviewPanel(pipe, bare, steps=1, size=64, background=False)
    assert all(r.lora is not None and not r.enabled.disabled and r.enabled.value for r in bare.rows)
    # MergePanel(base=pipe) from the start
    p = MergePanel(loras=files, background=False, debounce=60.0, output_dir=str(tmp_path), method="ta", base=pipe)
    assert all(r.error is None for r in p.rows)
    p.rows[0].strength.value = 0.7
    p.merge_button.click()
    assert p.last_error is None, p.last_error
    _assert_same_update(p.result.lora, core.merge(**p.merge_kwargs()).lora)
    # the CLI with --base (the UNet's diffusers component file) gives the same merge
    out = tmp_path / "cli.safetensors"
    r = run_cli("merge", *files, "-o", out, "--method", "ta", "--weights", "0.7,1", "--dtype", "fp32", "-q",
                "--base", dora_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert r.returncode == 0, r.stderr
    _assert_same_update(core.load_lora(str(out)), p.result.lora, rtol=1e-5)
    r = run_cli("merge", *files, "-o", tmp_path / "x.safetensors", "--method", "ta", "-q")
    assert r.returncode == 2 and "base" in r.stderr
