"""Reading checkpoint folders and writing converted ones without ever losing a user's data.

Sources are never modified. Every problem with a source is a `ConversionError` whose message names the file and the
fix. Outputs are assembled in a staging folder beside the destination and moved into place in one rename, so a failed
conversion leaves nothing behind. An existing destination is replaced only with `overwrite=True`, and only when it is
empty or an earlier `m2-convert` output (recognised by the `conversion_report.json` that lists what the tool wrote):
never a folder that holds, contains or lies inside the source, the current folder, a home folder or a root folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
    # Processors and chat templates, which pipelines of vision and chat models read beside the tokenizer.
    "preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json",
)
REPORT_FILE = "conversion_report.json"
TOOL = "m2-convert"
# Names a staging folder gets beside its destination, so that a later run can tell a killed run's leftovers apart.
_STAGING_INFIX = ".m2-convert-staging."
_BACKUP_INFIX = ".m2-convert-replaced."
_LEFTOVER = re.compile(rf"^\.(?P<name>.+?)(?:{re.escape(_STAGING_INFIX)}|{re.escape(_BACKUP_INFIX)})(?P<pid>\d+)\.")


class ConversionError(ValueError):
    """A source that cannot be converted as asked; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A checkpoint folder on this machine and the name reports and model cards give it (a Hub id or the folder's
    name, never a local path or a snapshot hash)."""

    path: Path
    name: str


def _hub_id_of_cache_snapshot(path: Path) -> Optional[str]:
    """``org/name`` for a folder of the Hub cache (``.../models--org--name/snapshots/<commit>``)."""
    resolved = path.resolve()
    repo_folder = resolved.parent.parent.name
    if resolved.parent.name == "snapshots" and repo_folder.startswith("models--"):
        return repo_folder[len("models--"):].replace("--", "/")
    return None


def _looks_like_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def local_folder(path, role: str = "source") -> Path:
    """``path`` as an existing folder, or a clear error."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"The {role} {path} is a file, not a checkpoint folder: pass the folder that holds "
                              "config.json and the weights.")
    existing = next((parent for parent in path.parents if parent.is_dir()), None)
    hint = f" ({existing} exists, but holds no {path.relative_to(existing)})" if existing not in (None, Path(".")) else ""
    raise ConversionError(f"The {role} folder {path} does not exist{hint}; check the path.")


def resolve_source(source) -> Source:
    """A local checkpoint folder, or the local snapshot of a Hub repo id (downloaded when the Hub is reachable)."""
    text = str(source)
    path = Path(source)
    first_part = Path(text.split("/")[0])
    if path.exists() or not _looks_like_hub_id(text) or first_part.is_dir():
        path = local_folder(path)
        return Source(path, _hub_id_of_cache_snapshot(path) or path.resolve().name)
    from huggingface_hub import snapshot_download

    try:
        return Source(Path(snapshot_download(text)), text)
    except Exception as error:  # offline, unknown repo, no access: all mean the source is not available
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(
            f"{text} is not a local folder, and getting it from the Hub failed ({type(error).__name__}: {reason}). "
            "Check the path, or the repo id and your access to the Hub."
        ) from error


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json: pass a checkpoint folder (config.json plus weights).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); restore the config.json the model was saved "
                              "with.") from error
    if not isinstance(config, dict):
        raise ConversionError(f"{path} holds a JSON {type(config).__name__}, not an object of settings; restore the "
                              "config.json the model was saved with.")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The files that hold a folder's weights: the shards of an index, or the single weights file."""
    for index_name in SHARD_INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ConversionError(f"{index} is not a valid shard index (a JSON object with a 'weight_map'): "
                                      f"{type(error).__name__}: {error}. Re-save the model.") from error
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing:
                raise ConversionError(f"{index} names shards that are not in {folder}: {', '.join(missing)}. Copy "
                                      "the whole checkpoint folder.")
            return [folder / shard for shard in shards]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ConversionError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES + SHARD_INDEXES)}.")


def _unreadable_safetensors(path: Path, error: Exception) -> ConversionError:
    return ConversionError(f"{path} is not a readable safetensors file (truncated or corrupt: {error}). Copy or "
                           "download it again.")


def _load_pickle(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses arbitrary pickled objects, by design
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused:
            raise ConversionError(
                f"{path} holds pickled Python objects besides tensors, which are never executed here "
                f"(torch.load(weights_only=True): {refused}). Save its state dict with safetensors from a trusted "
                "environment, then convert that."
            ) from error
        reason = next((line for line in lines if "Unsupported operand" in line), lines[0] if lines else "")
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt: {reason[:200]}). "
                              "Copy or download it again.") from error


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # SafetensorError, or OSError for unreadable files
            raise _unreadable_safetensors(path, error) from error
    state = _load_pickle(path)
    if isinstance(state, dict) and "state" in state and isinstance(state["state"], dict) and "model" in state["state"]:
        state = state["state"]["model"]  # a training-framework (Composer) checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors.")
    return state


def check_weight_files(folder: Path) -> list[str]:
    """Check every weights file of ``folder`` before Transformers reads it (safetensors headers; pickles loaded with
    ``weights_only=True``); returns the tensor names."""
    from safetensors import safe_open

    names = []
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    names.extend(handle.keys())
            except Exception as error:  # SafetensorError, or OSError for unreadable files
                raise _unreadable_safetensors(path, error) from error
        else:
            names.extend(_load_weight_file(path))
    return names


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: single-file or sharded, safetensors or (weights-only) pickle."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(_load_weight_file(path))
    return state


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where) -> None:
    """Refuse NaN or infinite weights: a projection or a model card computed from them would be meaningless."""
    for name, tensor in tensors:
        # A finite sum proves every value finite, at a fraction of the cost; the full check only runs otherwise.
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise ConversionError(f"{name} in {where} holds non-finite values (NaN or inf); fix the checkpoint "
                                  "first.")


def has_tokenizer_vocabulary(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer's vocabulary (a config alone builds a tokenizer that knows no word)."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES if name.startswith(("tokenizer.", "vocab", "merges",
                                                                                              "spiece", "sentencepiece")))


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def copy_sentence_transformers_files(source: Path, destination: Path) -> list[str]:
    """A sentence-transformers checkpoint's pipeline (``modules.json``, its module folders such as pooling and
    normalisation, their settings), so that the converted folder embeds text the way the source did."""
    modules_file = source / "modules.json"
    if not modules_file.is_file():
        return []
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        folders = [module["path"] for module in modules if module.get("path")]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ConversionError(f"{modules_file} is not a valid sentence-transformers module list ({error}); restore it, "
                              "or remove it to convert the bare Transformers model.") from error
    copied = []
    for name in (*SENTENCE_TRANSFORMERS_FILES, *folders):
        path = source / name
        if path.is_file():
            shutil.copy2(path, destination / name)
        elif path.is_dir():
            shutil.copytree(path, destination / name)
        else:
            continue
        copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------------------------------
# Destinations
# --------------------------------------------------------------------------------------------------------------------


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _written_by_m2_convert(folder: Path) -> Optional[set[str]]:
    """The entries an earlier `m2-convert` run wrote into ``folder``, or None if it is not such an output."""
    try:
        report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(report, dict) or report.get("tool") != TOOL or not isinstance(report.get("files"), list):
        return None
    return set(report["files"]) | {REPORT_FILE}


def destination_problem(destination: Path, sources: Iterable[Path], overwrite: bool) -> Optional[str]:
    """Why writing ``destination`` would lose or change something the user has, or None when it is safe."""
    target = Path(destination).resolve()
    if target == Path(target.anchor):
        return f"the destination {destination} is a root folder; name a new subfolder instead."
    if _is_inside(Path.home().resolve(), target):
        return f"the destination {destination} is (or contains) the home folder; name a new subfolder instead."
    if _is_inside(Path.cwd().resolve(), target):
        return f"the destination {destination} is (or contains) the current folder; name a new subfolder instead."
    for source in sources:
        source = Path(source).resolve()
        if target == source:
            return f"the destination {destination} is the source folder; the converter never modifies its source. " \
                   "Choose a new folder."
        if _is_inside(source, target):
            return f"the destination {destination} contains the source {source}; writing it would delete the " \
                   "source. Choose a folder outside it."
        if _is_inside(target, source):
            return f"the destination {destination} lies inside the source {source}; the converter never modifies " \
                   "its source. Choose a folder outside it."
    if not target.exists():
        return None
    if not target.is_dir():
        return f"the destination {destination} is a file; choose a folder name."
    entries = {entry.name for entry in target.iterdir()}
    if not entries:
        return None
    written = _written_by_m2_convert(target)
    if written is None:
        return f"the destination {destination} already exists and was not written by m2-convert (it has no " \
               f"{REPORT_FILE} of this tool); --overwrite only replaces an earlier m2-convert output or an empty " \
               "folder. Choose a new folder, or empty this one yourself."
    foreign = sorted(entries - written)
    if foreign:
        return f"the destination {destination} is an earlier m2-convert output, but holds files the tool did not " \
               f"write: {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}. Move them away first, or " \
               "choose a new folder."
    if not overwrite:
        return f"the destination {destination} already exists (an earlier m2-convert output); pass --overwrite " \
               "to replace it, or choose a new folder."
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def remove_leftovers(destination: Path) -> list[str]:
    """Remove the staging and replaced folders that killed runs into ``destination`` left beside it; their names."""
    destination = destination.resolve()
    removed = []
    if not destination.parent.is_dir():
        return removed
    for entry in destination.parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == destination.name and entry.is_dir() and not _process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return sorted(removed)


def _folder_mode() -> int:
    """The mode ``mkdir`` (and so ``save_pretrained``) gives a new folder under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


class OutputFolder:
    """Where a conversion writes. ``prepare()`` checks the destination and creates the staging folder before any work
    (so an unwritable destination is found at once); ``commit(report)`` writes the report, which lists every file
    written, and moves the staging folder into place in one rename; ``close()`` removes whatever is left."""

    def __init__(self, destination, sources: Iterable[Path], overwrite: bool = False, dry_run: bool = False) -> None:
        self.destination = Path(destination)
        self.sources = [Path(source) for source in sources]
        self.overwrite, self.dry_run = overwrite, dry_run
        self.staging: Optional[Path] = None
        self.removed_leftovers: list[str] = []

    def prepare(self) -> Optional[str]:
        """Refuse an unsafe destination (in a dry run, return the reason instead) and create the staging folder."""
        problem = destination_problem(self.destination, self.sources, self.overwrite)
        if self.dry_run:
            return problem
        if problem:
            raise ConversionError(problem[0].upper() + problem[1:])
        target = self.destination.resolve()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.removed_leftovers = remove_leftovers(target)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGING_INFIX}{os.getpid()}.",
                                                 dir=target.parent))
            self.staging.chmod(_folder_mode())
        except OSError as error:
            raise ConversionError(f"Cannot write the destination {self.destination} ({error.strerror or error}); "
                                  "choose a folder you can write to.") from error
        return None

    def commit(self, report: dict) -> None:
        files = sorted(entry.name for entry in self.staging.iterdir() if entry.name != REPORT_FILE)
        file_report = {"tool": TOOL, **report, "files": files}
        (self.staging / REPORT_FILE).write_text(json.dumps(file_report, indent=2), encoding="utf-8")
        target = self.destination.resolve()
        if target.exists():
            problem = destination_problem(self.destination, self.sources, self.overwrite)
            if problem:  # something else wrote there during the conversion
                raise ConversionError(problem[0].upper() + problem[1:])
            backup = target.with_name(f".{target.name}{_BACKUP_INFIX}{os.getpid()}.old")
            target.rename(backup)
            self.staging.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            self.staging.rename(target)
        self.staging = None

    def close(self) -> None:
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed Hub repo id before any work (an upload is the last step)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConversionError(f"--push-to-hub {repo_id!r} is not a Hub repo id ({error}); use NAME or "
                              "OWNER/NAME.") from error


def push_folder_to_hub(folder: Path, repo_id: str) -> str:
    """Upload a complete folder (a converted checkpoint, a fine-tuned model); a failure (offline, no token) leaves the
    folder as it is and says how to retry."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, exist_ok=True)
        return str(upload_folder(repo_id=repo_id, folder_path=str(folder)))
    except Exception as error:  # network, auth and Hub errors all mean the same here: not uploaded
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ConversionError(
            f"The folder {folder} is complete, but uploading it to {repo_id} failed ({type(error).__name__}: "
            f"{reason}). Upload it later with `hf upload {repo_id} {folder}`."
        ) from error
