"""Non-local blocks of the paper: grid tokenisation, locality weights, symmetry gate, the block."""

from .locality import locality_weights
from .nonlocal_block import VARIANTS, NonLocalBlock2d
from .symmetry import symmetry_gate
from .tokenize import grid_to_tokens, tokens_to_grid

__all__ = ["NonLocalBlock2d", "VARIANTS", "grid_to_tokens", "locality_weights", "symmetry_gate", "tokens_to_grid"]
