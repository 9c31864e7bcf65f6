"""A stand-in for ``torchaudio`` in ComfyUI test processes only (test-only, never installed).

Newer ComfyUI trees import torchaudio at module level from model code that ``comfy.sd`` loads at
start-up (``comfy/ldm/lightricks/vae/audio_vae.py``, ``comfy/text_encoders/gemma4.py``), so they do
not start without it. PyPI's torchaudio pins its own torch, and the project venv keeps only its
torch pin; the e2e tests never touch audio. `tests/comfy_support/runtime.py` puts the folder above
this one on a ComfyUI process's path only when torchaudio does not import and the tree needs it.

Every public attribute is a placeholder: importing and naming it works, using it raises.
"""
from ._stub import module_getattr as __getattr__  # noqa: F401
from . import functional, transforms  # noqa: F401

__version__ = "0.0.0+comfy-test-stub"
