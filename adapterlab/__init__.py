"""adapterlab: learn, teach and use LLaMA-Adapter (zero-init gated attention, arXiv 2303.16199)."""
from .model import Llama, LlamaConfig, KVCache
from .adapter import AdapterConfig, add_adapter, remove_adapter, adapter_state_dict, gate_values
from .io.adapters import load_adapter, save_adapter
from .worlds.tinyworld import load_llama  # a Meta / Hugging Face folder, a GGUF file, or a name ("tinyworld", "smollm2")

__version__ = "0.1.0"
__all__ = [
    "Llama", "LlamaConfig", "KVCache", "AdapterConfig", "add_adapter", "remove_adapter",
    "adapter_state_dict", "gate_values", "load_llama", "load_adapter", "save_adapter",
]
