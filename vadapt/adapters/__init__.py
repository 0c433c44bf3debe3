"""Adapter modules and the serialisable configs that vadapt.inject builds them from."""

from vadapt.adapters.bottleneck import BottleneckAdapter, BottleneckConfig, bottleneck_width
from vadapt.adapters.conv import ConvAdapter, ConvAdapterConfig
from vadapt.adapters.dora import DoRA, DoRAConfig
from vadapt.adapters.ia3 import IA3, IA3Config
from vadapt.adapters.lora import LoRA, LoRAConfig
from vadapt.adapters.prompts import PromptConfig, PromptStripConfig
from vadapt.adapters.ssf import SSF, SSFConfig

__all__ = ['BottleneckAdapter', 'BottleneckConfig', 'ConvAdapter', 'ConvAdapterConfig', 'DoRA',
           'DoRAConfig', 'IA3', 'IA3Config', 'LoRA', 'LoRAConfig', 'PromptConfig',
           'PromptStripConfig', 'SSF', 'SSFConfig', 'bottleneck_width']
