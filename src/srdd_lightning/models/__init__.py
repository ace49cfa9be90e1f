"""Plain ``nn.Module`` building blocks, usable without Lightning."""

from .tokenizer import TOKENIZER_PRESETS, MultiScaleTokenizer, TokenizerConfig, build_tokenizer, tokenizer_config
from .transformer import PRESETS as GENERATOR_PRESETS
from .transformer import GeneratorConfig, VARTransformer, build_generator, generator_config

__all__ = ["GENERATOR_PRESETS", "TOKENIZER_PRESETS", "GeneratorConfig", "MultiScaleTokenizer", "TokenizerConfig",
           "VARTransformer", "build_generator", "build_tokenizer", "generator_config", "tokenizer_config"]
