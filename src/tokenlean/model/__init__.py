from tokenlean.model.cache import KVCache
from tokenlean.model.config import ModelConfig
from tokenlean.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
