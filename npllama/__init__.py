"""npllama: LLaMA with every forward and backward pass written out as array math (NumPy or CuPy)."""
from .adamw import AdamW
from .config import LlamaConfig
from .generation import generate
from .model import forward, init_params, loss_and_grads
from .weights import load, save

__all__ = ["LlamaConfig", "init_params", "forward", "loss_and_grads", "load", "save", "generate", "AdamW"]
