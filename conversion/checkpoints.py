"""Reading checkpoint folders and writing converted ones safely.

Sources are never modified. Outputs are assembled in a temporary folder beside the destination and moved into place
in one rename, so a failed conversion leaves nothing behind; an existing destination is replaced only with
`overwrite=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors.torch import load_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json",
)


class ConversionError(ValueError):
    """A source that cannot be converted as asked; the message says what is wrong and what to do."""


def resolve_source(source) -> Path:
    """A local checkpoint folder as given, or the local snapshot of a Hub repo id (downloaded when the Hub is
    reachable)."""
    path = Path(source)
    if path.exists() or str(source).count("/") != 1 or str(source).startswith((".", "/")):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source)))
    except Exception as error:  # offline, unknown repo, no access: all mean the source is not available
        raise ConversionError(
            f"{source} is not a local folder, and fetching it from the Hub failed ({type(error).__name__}: {error}). "
            "Pass a local checkpoint folder, or make the Hub reachable."
        ) from error


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json: pass a checkpoint folder (config.json plus weights).")
    return json.loads(path.read_text(encoding="utf-8"))


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses arbitrary pickled objects, by design
        raise ConversionError(
            f"{path} is not a plain tensor checkpoint (torch.load(weights_only=True) refused it: {error}). Export "
            "its state dict to safetensors with the framework that wrote it, then convert that."
        ) from error
    if isinstance(state, dict) and "state" in state and isinstance(state["state"], dict) and "model" in state["state"]:
        state = state["state"]["model"]  # a training-framework (Composer) checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors.")
    return state


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: single-file or sharded, safetensors or (weights-only) pickle."""
    for index_name in SHARD_INDEXES:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_weight_file(folder / shard))
            return state
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _load_weight_file(folder / name)
    raise ConversionError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES + SHARD_INDEXES)}.")


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def check_destination(source: Path, destination: Path, overwrite: bool) -> None:
    if destination.resolve() == source.resolve():
        raise ConversionError("The destination is the source folder; the converter never modifies its source.")
    if destination.exists() and not overwrite:
        raise ConversionError(f"{destination} already exists; pass --overwrite to replace it.")


@contextlib.contextmanager
def atomic_output_folder(destination: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `destination` in one rename, on failure it disappears."""
    destination = destination.resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            if not overwrite:
                raise ConversionError(f"{destination} appeared during the conversion; pass --overwrite to replace it.")
            backup = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            destination.rename(backup)
            staging.rename(destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_model_folder(
    model,
    source: Path,
    destination: Path,
    overwrite: bool,
    extra: Optional[Callable[[Path, list[str]], None]] = None,
) -> list[str]:
    """``model.save_pretrained`` plus the source's tokenizer files (plus what ``extra(folder, tokenizer_files)``
    writes into the folder), all in place at ``destination`` at once or not at all; returns the tokenizer files."""
    with atomic_output_folder(destination, overwrite) as staging:
        model.save_pretrained(staging)
        copied = copy_tokenizer_files(source, staging)
        if extra is not None:
            extra(staging, copied)
    return copied


def push_folder_to_hub(folder: Path, repo_id: str) -> str:
    """Upload a complete folder (a converted checkpoint, a fine-tuned model); a failure (offline, no token) leaves the
    folder as it is and says how to retry."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, exist_ok=True)
        return str(upload_folder(repo_id=repo_id, folder_path=str(folder)))
    except Exception as error:  # network, auth and Hub errors all mean the same here: not uploaded
        raise ConversionError(
            f"The folder {folder} is complete, but uploading it to {repo_id} failed ({type(error).__name__}: "
            f"{error}). Upload it later with `huggingface-cli upload {repo_id} {folder}`."
        ) from error
