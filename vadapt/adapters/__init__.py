"""Adapter modules and the serialisable configs that vadapt.inject builds them from."""

from vadapt.adapters.bottleneck import BottleneckAdapter, BottleneckConfig, bottleneck_width
from vadapt.adapters.conv import ConvAdapter, ConvAdapterConfig
from vadapt.adapters.lora import LoRA, LoRAConfig
from vadapt.adapters.prompts import PromptConfig, PromptStripConfig

__all__ = ['BottleneckAdapter', 'BottleneckConfig', 'ConvAdapter', 'ConvAdapterConfig', 'LoRA',
           'LoRAConfig', 'PromptConfig', 'PromptStripConfig', 'bottleneck_width']
