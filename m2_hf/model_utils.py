"""What every model family of the package shares: initialisation of structured layers and shipping all heads' code."""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import initialization as init

from .monarch import BlockdiagLinear, MonarchLinear


def init_structured_layer(module: nn.Module) -> bool:
    """Initialise a Monarch or block-diagonal layer as its constructor does (with `transformers.initialization`, which
    leaves loaded tensors alone); returns whether ``module`` was one."""
    if not isinstance(module, (BlockdiagLinear, MonarchLinear)):
        return False
    for name, bound in module.uniform_init_bounds().items():
        init.uniform_(getattr(module, name), -bound, bound)
    return True


class ShipsAllHeadsMixin:
    """``save_pretrained`` writes an ``auto_map`` that names every Auto class of the model family, so that the saved
    folder loads through each of them with ``trust_remote_code=True`` (Transformers alone would name only the saved
    class). The package's ``__init__`` fills ``shipped_auto_map`` when it registers the family; where the code runs
    as remote code, the map of the loaded config is kept."""

    shipped_auto_map: ClassVar[dict[str, str]] = {}

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self.shipped_auto_map:
            self.config.auto_map = dict(self.shipped_auto_map)
        return super().save_pretrained(save_directory, *args, **kwargs)
