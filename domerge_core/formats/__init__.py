"""Readers and writers for LoRA files (safetensors only — nothing is ever unpickled).

STUB — the core I/O work (issue 2) implements these; their signatures are the contract.

- ``load_lora(path, *, adapter_config=None) -> Lora``: detect the format, read lazily.
- ``load_state_dict(sd, *, source="<state dict>", metadata=None) -> Lora``: same, from tensors.
- ``to_state_dict(lora, format, *, dtype=None, metadata=None) -> (dict, metadata)``.
- ``save_lora(lora, path, *, format="kohya", dtype=None, metadata=None, overwrite=False) -> str``.
- ``FORMATS``: the writable layouts: ("kohya", "diffusers", "peft").
"""
