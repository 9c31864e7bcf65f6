"""ComfyUI nodes for comfyui-domerge (installed as ``domerge_nodes``).

Thin adapters: each node turns ComfyUI inputs into one ``domerge_core`` call and its result into
ComfyUI types. Classic (V1) node API, so they load on old and current ComfyUI (see
options_node.py for why not V3).
"""
from .apply_node import DomergeApplyLora
from .lora_list import DomergeLoraList
from .merge_node import DomergeMergeLoras
from .options_node import options_nodes
from .report_node import DomergeMergeReport
from .save_node import DomergeSaveLora

NODE_CLASS_MAPPINGS = {
    "DomergeLoraList": DomergeLoraList,
    "DomergeMergeLoras": DomergeMergeLoras,
    "DomergeApplyLora": DomergeApplyLora,
    "DomergeSaveLora": DomergeSaveLora,
    "DomergeMergeReport": DomergeMergeReport,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DomergeLoraList": "LoRA list (DO-Merge)",
    "DomergeMergeLoras": "DO-Merge LoRAs",
    "DomergeApplyLora": "Apply Merged LoRA",
    "DomergeSaveLora": "Save Merged LoRA",
    "DomergeMergeReport": "LoRA Merge Report",
}

# one "Merge options: <method>" node per method in the core's registry
_OPTION_CLASSES, _OPTION_NAMES = options_nodes()
NODE_CLASS_MAPPINGS.update(_OPTION_CLASSES)
NODE_DISPLAY_NAME_MAPPINGS.update(_OPTION_NAMES)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
