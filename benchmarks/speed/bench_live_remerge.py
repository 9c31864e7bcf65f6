"""How fast does a live strength-slider move re-merge? (notebook toolkit, issue 5)

Three real-shape synthetic SDXL LoRAs (UNet attention modules + both text encoders, rank 32,
alpha 16, fp16, kohya SGM names: 722 + 72 + 192 = 986 modules each) are written to /tmp once.
Then, for each method:

- ``cold``: the first merge through a fresh ``MergeCache`` (balanced forms, orthogonalization, ...);
- ``warm core``: ``domerge_core.merge`` again with other strengths and the warm cache — the work a
  slider move costs in the core;
- ``warm panel``: the same through the widget: a ``MergePanel`` (live mode, merging on this thread),
  a strength slider set, the debounce flushed; split into the core merge and the panel's rendering
  (diagnostics table + plots).

    python benchmarks/speed/bench_live_remerge.py [--methods do,ta] [--repeats 3] [--threads 1]

Prints a table; warm numbers are "median (min)" over ``--repeats`` slider moves. The panel shows
the numbers as soon as the merge is done and draws the plots after (a newer slider move skips
them), so "answer" = the merge, "with plots" = merge + table + redrawn plots; "CPU time" is the
process CPU time of the whole slider move (with one torch thread, what it takes on an idle core:
the wall times depend on how busy the machine is, and the load average is printed).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def sdxl_shapes() -> Dict[str, tuple]:
    """Canonical key -> (out, in) of what kohya's sd-scripts targets on SDXL (no LoCon) + CLIP-L/bigG."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    out: Dict[str, tuple] = {}
    for name, mod in unet.named_modules():
        if mod.__class__.__name__ != "Transformer2DModel":
            continue
        for cname, ch in mod.named_modules():
            if isinstance(ch, torch.nn.Linear):
                out[f"unet.{name}.{cname}"] = (ch.out_features, ch.in_features)
    for comp, hidden, layers, inter in (("text_encoder", 768, 12, 3072), ("text_encoder_2", 1280, 32, 5120)):
        for i in range(layers):
            p = f"{comp}.text_model.encoder.layers.{i}."
            for k in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[p + "self_attn." + k] = (hidden, hidden)
            out[p + "mlp.fc1"] = (inter, hidden)
            out[p + "mlp.fc2"] = (hidden, inter)
    return out


def write_synthetic(path: str, shapes: Dict[str, tuple], rank: int, alpha: float, seed: int) -> None:
    from domerge_core import LoraModule, Lora, tiny

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for key, (m, n) in shapes.items():
        down = (torch.randn(rank, n, generator=g) / n ** 0.5).half()
        up = (torch.randn(m, rank, generator=g) * 0.01).half()
        mods[key] = LoraModule.from_tensors(key, up, down, alpha / rank)
    lora = Lora(modules=mods, format="kohya", source=path, dtype=torch.float16, base_model="sdxl")
    tmp = path + ".tmp"
    tiny.write_kohya(lora, tmp, sgm=True, alpha_dtype=torch.float16,
                     metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                               "ss_base_model_version": "sdxl_base_v1-0"})
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="do,ta")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/domerge_bench_live")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import domerge_core as core
    from domerge_widgets import MergePanel

    os.makedirs(args.dir, exist_ok=True)
    paths = [os.path.join(args.dir, f"sdxl_r{args.rank}_{i}.safetensors") for i in range(3)]
    if not all(os.path.isfile(p) for p in paths):
        t = time.perf_counter()
        shapes = sdxl_shapes()
        for i, p in enumerate(paths):
            write_synthetic(p, shapes, args.rank, 16.0, seed=i)
        print(f"wrote 3 synthetic SDXL LoRAs ({len(shapes)} modules each) in {time.perf_counter() - t:.1f} s")
    loras = [core.load_lora(p) for p in paths]
    print(f"inputs: {len(loras[0])} modules each, rank {args.rank}, {os.path.getsize(paths[0]) / 2**20:.0f} MiB each; "
          f"torch threads {torch.get_num_threads()}, device {args.device}")

    moves = [[0.8, 1.0, 1.0], [0.8, 0.6, 1.0], [0.8, 0.6, 1.3], [0.5, 0.6, 1.3], [0.5, 0.9, 1.3],
             [0.5, 0.9, 0.7], [1.1, 0.9, 0.7], [1.1, 0.4, 0.7]]
    rows: List[tuple] = []
    for method in args.methods.split(","):
        cache = core.MergeCache()
        t = time.perf_counter()
        core.merge(loras, method, weights=[1.0, 1.0, 1.0], device=args.device, cache=cache)
        cold = time.perf_counter() - t
        warm = []
        for w in moves[: args.repeats]:
            t = time.perf_counter()
            core.merge(loras, method, weights=w, device=args.device, cache=cache)
            warm.append(time.perf_counter() - t)
        del cache
        gc.collect()

        panel = MergePanel(loras=paths, method=method, device=args.device, live=True, background=False,
                           debounce=3600)
        panel.merge_button.click()
        if panel.last_error:
            raise SystemExit(f"panel merge failed: {panel.last_error}")
        cold_panel = panel.last_timing
        pm, pr, tot, cpu = [], [], [], []
        for w in moves[: args.repeats]:
            t = time.perf_counter()
            c = time.process_time()
            for row, v in zip(panel.rows, w):
                row.strength.value = v
            panel.debouncer.flush()
            tot.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            if panel.last_error:
                raise SystemExit(f"panel merge failed: {panel.last_error}")
            pm.append(panel.last_timing["merge_s"])
            pr.append(panel.last_timing["render_s"])
        rows.append((method, cold, _mm(warm), cold_panel["merge_s"] + cold_panel["render_s"], _mm(pm), _mm(tot),
                     _mm(cpu)))
        del panel
        gc.collect()

    print()
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| method | cold merge (core) | warm re-merge (core) | cold (panel) | slider move: answer | "
          "slider move: with plots | same, CPU time |")
    print("|---|---|---|---|---|---|---|")
    for m, c, w, cp, pm_, tot_, cpu_ in rows:
        print(f"| {m} | {c:.2f} s | {w} | {cp:.2f} s | {pm_} | {tot_} | {cpu_} |")


def _mm(xs: List[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f})"


if __name__ == "__main__":
    main()
