"""m2-hf: Monarch matrices and the Monarch Mixer (M2) model family for Hugging Face Transformers."""

from .monarch import (
    BlockdiagLinear,
    MonarchLinear,
    blockdiag_factor_shape,
    blockdiag_multiply,
    monarch_factor_shapes,
    monarch_multiply,
    project_blockdiag,
    project_monarch,
    projection_error,
    set_monarch_backend,
)

__version__ = "0.1.0"

__all__ = [
    "BlockdiagLinear",
    "MonarchLinear",
    "blockdiag_factor_shape",
    "blockdiag_multiply",
    "monarch_factor_shapes",
    "monarch_multiply",
    "project_blockdiag",
    "project_monarch",
    "projection_error",
    "set_monarch_backend",
]
