"""The official M2-BERT code (HazyResearch/m2, `bert/src`) at a pinned commit, imported for comparisons on the CPU.

Nothing of the official code is part of this repository: `official_source` exports `bert/src` of the pinned commit
from a git repository (a clone, or the bare copy a mirroring tool made), cloning it from GitHub when none is given,
and `import_official` imports its model classes. The official code imports `einops` and `opt_einsum`
(`pip install einops opt_einsum` in the environment that runs these scripts; m2-hf and its tests do not need them).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tarfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

OFFICIAL_URL = "https://github.com/HazyResearch/m2"
# HEAD of HazyResearch/m2 in Dec 2024; the model code has not changed since the initial commit (Jul 2023).
PINNED_COMMIT = "7d359e8ce0d18294d840d1ed775ec920b3b48afd"

# Attributes the official heads read without declaring them in their config class (AttributeError without them).
UNDECLARED_HEAD_FIELDS = ("use_cls_token", "sequence_token_planting", "expand_positional_embeddings",
                          "gather_sentence_embeddings", "use_normalized_embeddings", "performing_BEIR_evaluation")


@dataclass
class OfficialModels:
    BertConfig: type
    BertForMaskedLM: type
    BertForSequenceClassification: type
    commit: str


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def official_source(destination: Path, official_repo: Optional[Path] = None) -> Path:
    """``bert/`` of HazyResearch/m2 at :data:`PINNED_COMMIT`, exported under ``destination``.

    ``official_repo`` is any git repository that holds the commit (a clone or a bare mirror); without it the official
    repository is cloned from GitHub into ``destination``."""
    if official_repo is None:
        official_repo = destination / "m2.git"
        if not official_repo.exists():
            _git("clone", "--bare", "--quiet", OFFICIAL_URL, str(official_repo))
    try:
        _git("-C", str(official_repo), "cat-file", "-e", f"{PINNED_COMMIT}^{{commit}}")
    except subprocess.CalledProcessError as error:
        raise SystemExit(
            f"{official_repo} does not hold the pinned commit {PINNED_COMMIT} of {OFFICIAL_URL}: pass a clone made "
            f"after Dec 2024 (`git clone {OFFICIAL_URL}`), or run `git fetch` in it."
        ) from error
    exported = destination / f"m2-{PINNED_COMMIT[:12]}"
    if not (exported / "bert" / "src" / "bert_layers.py").exists():
        archive = subprocess.run(["git", "-C", str(official_repo), "archive", "--format=tar", PINNED_COMMIT, "bert/src"],
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(exported, filter="data")
    return exported / "bert"


def import_official(bert: Path) -> OfficialModels:
    """The official config and head classes from an exported ``bert/`` folder (see :func:`official_source`)."""
    try:
        import einops  # noqa: F401
        import opt_einsum  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"The official code imports {error.name}: `pip install einops opt_einsum`.") from error
    sys.path[:0] = [str(bert), str(bert / "src")]
    # `src/__init__.py` imports the training framework (composer); the model files do not need it.
    package = types.ModuleType("src")
    package.__path__ = [str(bert / "src")]
    sys.modules["src"] = package
    with quiet():
        from src.bert_layers import BertForMaskedLM, BertForSequenceClassification
        from src.configuration_bert import BertConfig
    return OfficialModels(BertConfig, BertForMaskedLM, BertForSequenceClassification, PINNED_COMMIT)


def quiet():
    """The official modules print their settings when built and warnings when run."""
    return contextlib.redirect_stdout(io.StringIO())


def official_config(models: OfficialModels, **fields):
    """An official config in M2 mode with ``fields``; the heads' undeclared attributes default to False."""
    head_fields = {name: fields.pop(name, False) for name in UNDECLARED_HEAD_FIELDS}
    config = models.BertConfig(monarch_mixer_sequence_mixing=True, **fields)
    for name, value in head_fields.items():
        setattr(config, name, value)
    return config


OUTPUT_NAME = {"mlm": "logits", "classifier": "logits", "retrieval": "sentence_embedding"}
ARCHITECTURE = {"mlm": "BertForMaskedLM", "classifier": "BertForSequenceClassification",
                "retrieval": "BertForSequenceClassification"}
AUTO_MAP = {"mlm": {"AutoModelForMaskedLM": "bert_layers.BertForMaskedLM"},
            "classifier": {"AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification"},
            "retrieval": {"AutoModelForSequenceClassification": "bert_layers.BertForTextEncoding"}}

def build_official(models: OfficialModels, head: str, **fields):
    """The official model of ``head`` (``"mlm"``, ``"classifier"`` or ``"retrieval"``) for config ``fields``, in eval
    mode, with its own initialisation (seed it with ``torch.manual_seed``)."""
    if head == "mlm":
        model_class = models.BertForMaskedLM
    else:
        # The released retrieval models are classification models with 10 labels whose forward returns the pooled
        # output as `sentence_embedding` (unnormalised here: the official normalisation asserts a width of 768).
        fields = dict(fields, num_labels=10 if head == "retrieval" else 3, gather_sentence_embeddings=head == "retrieval")
        model_class = models.BertForSequenceClassification
    with quiet():
        return model_class(official_config(models, **fields)).eval()


def move_to_trained_scale(model: torch.nn.Module, seed: int) -> None:
    """Add to every parameter a random change of the size training gives it: O(1) relative to its initialisation,
    and weights of standard deviation 1/sqrt(fan-in), so that no part of the mixer is negligible."""
    generator = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "freq":
                scale = 3.0  # sine frequencies start at hyena_w = 10
            elif leaf == "z":
                scale = 0.3  # positional features lie in [-1, 1]
            elif name.endswith("filter_fn.bias") or name.endswith("filter_fn2.bias"):
                scale = 1.0  # the D terms start at N(0, 1)
            elif parameter.dim() == 1:
                scale = 0.3  # biases (zero at init) and LayerNorm weights (one at init)
            else:
                scale = parameter.shape[-1] ** -0.5  # weights: fan-in = last dimension (block-diagonal: per block)
            parameter.add_(scale * noise)


def official_output(model, head: str, ids: torch.Tensor) -> torch.Tensor:
    with quiet():
        if head == "mlm":
            return model(ids).logits
        output = model(ids)
    return output["sentence_embedding"] if head == "retrieval" else output.logits


def official_output_of_short_input(model, head: str, ids: torch.Tensor) -> torch.Tensor:
    """The head's output for an input shorter than `max_position_embeddings`. The official classification head
    asserts full-length inputs, so its backbone and final layer are called as its forward calls them."""
    if head == "mlm":
        return official_output(model, head, ids)
    with quiet():
        pooled = model.bert(ids, attention_mask=torch.ones_like(ids))[1]
    return pooled if head == "retrieval" else model.classifier(model.dropout(pooled))


def released_config(model, head: str) -> dict:
    config = model.config.to_dict()
    for key in ("dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures", "auto_map"):
        config.pop(key, None)
    config.update(model_type="m2_bert", architectures=[ARCHITECTURE[head]], torch_dtype="float32",
                  transformers_version="4.28.1",
                  auto_map={"AutoConfig": "configuration_bert.BertConfig", "AutoModel": "bert_layers.BertModel",
                            **AUTO_MAP[head]})
    return dict(sorted(config.items()))


def write_released_folder(model, head: str, folder: Path) -> None:
    """``config.json`` and ``pytorch_model.bin`` as the released checkpoints have them: a pickled fp32 state dict with
    the shared sine frequency under all six official names, and the remote-code `auto_map`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(released_config(model, head), indent=2) + "\n")
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               folder / "pytorch_model.bin")


def add_arguments(parser) -> None:
    parser.add_argument("--official-repo", type=Path, default=None,
                        help=f"a git repository holding {OFFICIAL_URL} at {PINNED_COMMIT[:7]} (a clone or a bare "
                             "mirror); cloned from GitHub into --work-dir when not given")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/m2-official"),
                        help="where the official code is exported (and cloned)")
