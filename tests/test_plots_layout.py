"""The report figures: blocks in model order, and no tick label cut off at the figure's edge."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from domerge_core.report import plots  # noqa: E402

TE = "text_encoder.text_model.encoder.layers."


def test_blocks_sort_in_model_order_not_as_text():
    blocks = [TE + "10", "unet.up_blocks.1", "unet.mid_block.attentions.0", TE + "2", "unet.down_blocks.1",
              "unet.mid_block.resnets.1", "unet.mid_block.resnets.0", "unet.down_blocks.0", TE + "0",
              "text_encoder_2.text_model.encoder.layers.0", "unet.up_blocks.0"]
    assert sorted(blocks, key=plots.block_order_key) == [
        TE + "0", TE + "2", TE + "10", "text_encoder_2.text_model.encoder.layers.0",
        "unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block.resnets.0", "unet.mid_block.attentions.0",
        "unet.mid_block.resnets.1", "unet.up_blocks.0", "unet.up_blocks.1"]
    dit = ["transformer.single_transformer_blocks.0", "transformer.transformer_blocks.10",
           "transformer.transformer_blocks.2"]
    assert sorted(dit, key=plots.block_order_key) == [
        "transformer.transformer_blocks.2", "transformer.transformer_blocks.10", "transformer.single_transformer_blocks.0"]


def test_report_plots_blocks_in_model_order():
    blocks = {TE + str(i): {"update_norms": [float(i), 1.0]} for i in (0, 1, 2, 10, 11)}
    report = {"inputs": ["a", "b"], "weights": [1.0, 1.0], "diagnostics": {"blocks": blocks}}
    (key, _, kw), = plots.plot_data(report)
    assert kw["blocks"] == ["te.L0", "te.L1", "te.L2", "te.L10", "te.L11"]
    assert kw["norms"][0] == [0.0, 1.0, 2.0, 10.0, 11.0]


@pytest.mark.parametrize("names", [["tiny_kohya_a", "tiny_kohya_b", "tiny_peft_c"],
                                   ["a_rather_long_lora_name_v2.safetensors", "b", "character_fox"]])
def test_heatmap_and_block_labels_stay_inside_the_figure(names):
    n = len(names)
    fig = plots.cosine_figure(names, np.eye(n), np.eye(n))
    blocks = [plots.block_label(TE + str(i)) for i in range(12)] + ["down.0", "mid.attn.0", "up.1"]
    fig2 = plots.block_norms_figure(names, blocks, [[1.0] * len(blocks)] * n)
    for f in (fig, fig2):
        f.canvas.draw()
        r = f.canvas.get_renderer()
        W, H = f.canvas.get_width_height()
        for ax in f.axes:
            for t in ax.get_xticklabels() + ax.get_yticklabels():
                if not t.get_text():
                    continue
                bb = t.get_window_extent(r)
                assert bb.x0 >= 0 and bb.y0 >= 0 and bb.x1 <= W and bb.y1 <= H, (t.get_text(), bb, W, H)
