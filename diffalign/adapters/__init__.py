"""Model-family adapters over diffusers pipelines."""

from diffalign.adapters.base import Conditioning, DiffusionAdapter, Schedule
from diffalign.adapters.flux import FluxAdapter
from diffalign.adapters.flux2 import Flux2Adapter
from diffalign.adapters.flux_kontext import FluxKontextAdapter
from diffalign.adapters.qwenimage import QwenImageAdapter
from diffalign.adapters.registry import (
    ADAPTERS,
    UnsupportedPipelineError,
    adapter_class_for,
    load_adapter,
    load_pipeline,
    register_adapter,
    unregister_adapter,
)
from diffalign.adapters.sana import SanaAdapter
from diffalign.adapters.sd import StableDiffusionAdapter
from diffalign.adapters.sd3 import StableDiffusion3Adapter
from diffalign.adapters.sdxl import StableDiffusionXLAdapter
from diffalign.adapters.zimage import ZImageAdapter


__all__ = [
    "ADAPTERS",
    "Conditioning",
    "DiffusionAdapter",
    "Flux2Adapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "QwenImageAdapter",
    "SanaAdapter",
    "Schedule",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "UnsupportedPipelineError",
    "ZImageAdapter",
    "adapter_class_for",
    "load_adapter",
    "load_pipeline",
    "register_adapter",
    "unregister_adapter",
]
