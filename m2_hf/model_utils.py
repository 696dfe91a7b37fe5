"""What every model family of the package shares: initialisation of structured layers, shipping all heads' code,
sentence-transformers files for text encoders."""

from __future__ import annotations

import json
from pathlib import Path
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


def write_sentence_transformers_files(folder, normalize: bool) -> None:
    """Make ``folder`` (a saved text encoder) a sentence-transformers model whose embedding is exactly the model's
    own: sentence-transformers' ``Transformer`` module loads the base model (``AutoModel``) and reads its
    ``pooler_output`` as the sentence embedding, followed by ``Normalize`` when the model L2-normalises it. Plain JSON,
    so that saving needs no sentence-transformers (which reads these files from version 6 on)."""
    folder = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}]
    if normalize:
        modules.append({"idx": 1, "name": "1", "path": "1_Normalize",
                        "type": "sentence_transformers.base.modules.normalize.Normalize"})
        _write_json(folder / "1_Normalize" / "config.json",
                    {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "pooler_output"}},
        "module_output_name": "sentence_embedding",
    })
    _write_json(folder / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
