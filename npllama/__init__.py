"""npllama: LLaMA with every forward and backward pass written out as array math (NumPy or CuPy).

The public API; runs (train.start, train.resume, classify.run) are in their modules."""
__version__ = "0.3.0"

from .adamw import AdamW
from .conversation import ChatSession, chat
from .config import LlamaConfig
from .generation import generate
from .io.weights import load, save
from .model import forward, init_params, loss, loss_and_grads

__all__ = ["LlamaConfig", "init_params", "forward", "loss", "loss_and_grads", "load", "save", "generate", "chat",
           "ChatSession", "AdamW"]
