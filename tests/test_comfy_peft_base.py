"""The ComfyUI merge node reads PEFT DoRA (``lora_magnitude_vector``) against the connected MODEL:
the base weight comes through ComfyUI's key maps (``nodes/comfy_glue.base_weight_fn``), and the
node's merge ('ta', full rank, applied at 1) patches PEFT's merged update m·V/‖V‖_row − W
(V = W + s·BA) — which stock LoraLoader does not load (it has no PEFT DoRA)."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from comfy_support import runtime

runtime.import_comfy_library()


def test_merge_node_reads_peft_dora_against_the_connected_model(tmp_path):
    from comfy_support import library
    from comfy_support import tiny_sd15 as t
    import domerge_nodes
    import folder_paths

    dirs = library.setup_folders(tmp_path)
    shapes, targets = t._meta_shapes(), t._unet_targets()
    g = torch.Generator().manual_seed(5)
    sd, picked = {}, t._pick(targets, t._ATTN)[:6]
    for diff_path, ckey in picked:
        m, n = shapes[ckey]
        sd[f"unet.{diff_path}.lora_A.weight"] = torch.randn(4, n, generator=g) / n ** 0.5
        sd[f"unet.{diff_path}.lora_B.weight"] = torch.randn(m, 4, generator=g) * 0.3
        sd[f"unet.{diff_path}.lora_magnitude_vector"] = torch.rand(m, generator=g) + 0.5
    meta = {"unet.r": 4, "unet.lora_alpha": 2, "unet.use_dora": True}
    save_file(sd, str(dirs["loras"] / "peft_dora.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    folder_paths.filename_list_cache.clear()
    model, clip, _ = library.load_checkpoint()
    (loras,) = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeLoraList"]().build("peft_dora.safetensors", 1.0)
    node = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeMergeLoras"]()
    widgets = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items()
               if k not in ("loras", "method") and isinstance(v[1], dict) and "default" in v[1]}
    merged, _ = node.merge(loras, "ta", model=model, clip=clip, **widgets)
    m1, _ = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeApplyLora"]().apply(model, clip, merged, 1.0, 1.0)
    assert len(m1.patches) == len(picked)
    worst = 0.0
    for diff_path, ckey in picked:
        key = next(k for k in m1.patches if k.endswith(ckey.split("model.", 1)[-1]))
        W = library.patched_weight(model, key)
        V = W + 0.5 * (sd[f"unet.{diff_path}.lora_B.weight"].double() @ sd[f"unet.{diff_path}.lora_A.weight"].double())
        want = V * (sd[f"unet.{diff_path}.lora_magnitude_vector"].double() / V.norm(dim=1))[:, None] - W
        got = library.patched_weight(m1, key) - W
        worst = max(worst, float((got - want).norm() / want.norm()))
    print(f"PEFT DoRA via node: worst rel err {worst:.2e}")
    assert worst < 1e-5
