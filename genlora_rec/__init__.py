"""GenLoRA adapters for the dense towers: the towers (DNN, DeepFM, DCNv2) and their LoRA /
GenLoRA adapters (PEFT-like: a config, a tuner layer with ``merge`` / ``unmerge``, adapters
saved as ``adapter_config.json`` + weights).

    from genlora_rec import GenLoRAConfig, inject_adapters, merge_adapters, save_adapter
"""

from genlora_rec.adapters import (
    inject_adapters,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    trainable_parameter_count,
    unmerge_adapters,
)
from genlora_rec.effective_rank import effective_rank
from genlora_rec.genlora import GenLoRAConfig, GenLoRALinear
from genlora_rec.lora import LoRAConfig, LoRALinear
from genlora_rec.towers import TOWERS, build_tower

__all__ = ["TOWERS", "GenLoRAConfig", "GenLoRALinear", "LoRAConfig", "LoRALinear", "build_tower", "effective_rank",
           "inject_adapters", "load_adapter", "merge_adapters", "merge_and_unload", "save_adapter",
           "trainable_parameter_count", "unmerge_adapters"]
