"""Checkpoints with torch.distributed.checkpoint (DCP), committed atomically.

Layout of a run's checkpoints::

    RUN/checkpoints/step-1200/     .metadata + __R_0.distcp (DCP: sharded model + optimizers)
                                   rng-rank-R.pt  (each rank's torch RNG state, tensors only)
                                   trainer_state.json  (step, epoch, reader position, early stopping)
    RUN/checkpoints/best/          the best validation checkpoint (same layout), if tracked
    RUN/checkpoints/.step-1300.tmp a save in progress (or interrupted): never loaded

Every rank writes its shards into ``.step-K.tmp``; rank 0 writes ``trainer_state.json`` last and
renames the directory to ``step-K`` only after all ranks finished. A checkpoint counts as
complete when it has its final name, DCP's ``.metadata`` and a ``trainer_state.json`` whose
``complete`` flag is set, so a half-written one is never picked. DCP re-shards on load, so a
checkpoint saved on N ranks loads on M.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

from trec.config import CheckpointConfig
from trec.distributed import DistContext, barrier
from trec.errors import TrecError
from trec.io import JsonField, atomic_write_json, check_json_fields, quote, read_json_object

logger = logging.getLogger("trec")

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
BEST = "best"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs (stored as JSON)."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Epoch of the next batch to train."""
    batch_in_epoch: int = 0
    """Batches of that epoch already trained (the reader resumes right after them)."""
    samples: int = 0
    """Training rows seen by all ranks together."""
    best_metric: float | None = None
    best_step: int = -1
    evals_without_improvement: int = 0
    world_size: int = 1
    complete: bool = True
    early_stopped: bool = False
    """Training stopped early (no improvement for ``early_stopping_patience`` evaluations): a start
    on this checkpoint has nothing left to train."""
    dataset_fingerprint: str = ""
    """:func:`trec.runs.dataset_fingerprint` of the dataset trained on ("" in older checkpoints)."""


def is_complete(path: Path) -> bool:
    state = path / STATE_FILE
    if not (path / ".metadata").is_file() or not state.is_file():
        return False
    try:
        payload = json.loads(state.read_text())
    except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
        return False
    return isinstance(payload, dict) and payload.get("complete") is True


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete ``step-K`` checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    complete = complete_checkpoints(Path(directory))
    return complete[-1] if complete else None


_JSON_KINDS = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}
# Integer fields are counts (>= 0) unless listed here.
_STATE_MINIMUM = {"best_step": -1, "world_size": 1}
# Fields every trainer_state.json ever written has; a field added later must have a default,
# since older checkpoints lack it (a missing step would silently restart from 0).
_STATE_REQUIRED = ("step", "epoch", "batch_in_epoch", "samples", "world_size", "complete")


def _state_fields() -> dict[str, JsonField]:
    """TrainerState's fields as declared JSON types, read off its annotations (``int``, ``float | None``...)."""
    fields = {}
    for field in dataclasses.fields(TrainerState):
        annotation = str(field.type).replace(" ", "")
        nullable = annotation.endswith("|None")
        kind = _JSON_KINDS[annotation.removesuffix("|None").split("[")[0]]
        minimum = _STATE_MINIMUM.get(field.name, 0) if kind is int else None
        fields[field.name] = JsonField(kind, minimum, nullable=nullable, required=field.name in _STATE_REQUIRED)
    return fields


def read_trainer_state(path: Path) -> TrainerState:
    """``PATH/trainer_state.json``, every field type-checked (TrecError naming the file and field)."""
    file = Path(path) / STATE_FILE
    payload = read_json_object(file)
    check_json_fields(payload, _state_fields(), str(file), allow_unknown=False)
    return TrainerState(**payload)


# --------------------------------------------------------------------------------------------
# reading checkpoints without running code from them
# --------------------------------------------------------------------------------------------

# The globals a DCP .metadata pickle of a trec checkpoint refers to. torch's weights-only
# unpickler cannot read it (it rejects the protocol-4 FRAME opcode DCP writes), and plain
# pickle.load runs whatever a planted file names (os.system...), so the metadata is read by an
# unpickler that resolves these and nothing else.
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # StorageMeta.checkpoint_id (3.13 moved it)
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "TensorProperties",
        "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any global but DCP's own metadata classes, torch.Size and dtypes is refused."""

    def __init__(self, file, where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _METADATA_GLOBALS and not is_dtype:
            raise TrecError(f"{self.where}: refused to load global {quote(f'{module}.{name}')} "
                            f"(not a checkpoint metadata class; the file was not written by trec)")
        return super().find_class(module, name)


def _check_storage_data(metadata: object, where: str) -> None:
    """The shape DCP relies on; every data file named must be a plain name inside the checkpoint."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise TrecError(f"{where}: not DCP checkpoint metadata (holds {type(metadata).__name__})")
    for key, info in metadata.storage_data.items():
        if not isinstance(key, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise TrecError(f"{where}: storage entry {quote(key)} is not a DCP storage record")
        name = info.relative_path
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise TrecError(f"{where}: data file {quote(name)} of {quote(key.fqn)} is not a file in the checkpoint")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (info.offset, info.length)):
            raise TrecError(f"{where}: {quote(key.fqn)} has a bad offset/length "
                            f"({quote(info.offset)}, {quote(info.length)})")


def _check_data_sizes(metadata: Metadata, checkpoint: Path) -> None:
    """Every data file must be long enough for the byte ranges the metadata assigns in it.

    DCP reads only the ranges a load needs: a truncated ``.distcp`` whose lost tail held, say,
    optimizer state would still load a model for evaluation or export without a word.
    """
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = checkpoint / name
        try:
            actual = path.stat().st_size
        except OSError as error:
            raise TrecError(f"{path}: cannot be read ({error.strerror or error}); the checkpoint is damaged") from None
        if actual < size:
            raise TrecError(f"{path}: truncated ({actual} bytes; {checkpoint / '.metadata'} needs {size}); "
                            "the checkpoint is damaged")


class SafeFileSystemReader(FileSystemReader):
    """torch's DCP FileSystemReader, except that ``.metadata`` is read without running code.

    A global outside :data:`_METADATA_GLOBALS`, a damaged pickle, or a storage record naming a
    file outside the checkpoint is a TrecError naming the file. The metadata is read once and
    kept, so that :func:`load_checkpoint` can read it before DCP does and report a bad file as
    that one line on every rank rather than as a CheckpointException from inside DCP.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._metadata: dict[object, Metadata] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        self._metadata = {}

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            self._metadata[rank] = self._read(self._get_metadata_path(rank))
        metadata = self._metadata[rank]
        # What FileSystemReader.read_metadata does after unpickling (torch 2.13).
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _read(self, path) -> Metadata:
        where = str(path)
        with self.fs.create_stream(path, "rb") as handle:
            try:
                metadata = _MetadataUnpickler(handle, where).load()
            except TrecError:
                raise
            except Exception as error:  # truncated or garbled: any failure means "not readable"
                raise TrecError(f"{where}: not readable checkpoint metadata ({_first_line(error)})") from None
        _check_storage_data(metadata, where)
        _check_data_sizes(metadata, Path(where).parent)
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor entries load with ``weights_only=True``.

    DefaultLoadPlanner.load_bytes calls ``torch.load(weights_only=False)`` on bytes read from
    the ``.distcp`` files: a planted entry there would run code as surely as ``.metadata``.
    """

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as error:
            raise TrecError(f"checkpoint entry {quote(fqn)}: refused or unreadable ({_first_line(error)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load_checkpoint(state_dict: dict, path: Path) -> None:
    """``dcp.load`` of ``state_dict`` (in place) from checkpoint ``path``, never running code from its files.

    Every load trec does goes through here. A hostile or damaged checkpoint is one TrecError.
    """
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # a bad .metadata fails here, on every rank alike, before any collective
    try:
        dcp.load(state_dict, storage_reader=reader, planner=_SafeLoadPlanner())
    except CheckpointException as error:
        raise TrecError(f"{path}: cannot be loaded ({_first_failure(error)})") from None


def _first_failure(error: CheckpointException) -> str:
    """'rank R: Type: first line' of the lowest failing rank (DCP's own message has every traceback)."""
    if not error.failures:
        return "unknown failure"
    rank = min(error.failures)
    failure = error.failures[rank]
    exc = failure[0] if isinstance(failure, tuple) else failure
    return str(exc) if isinstance(exc, TrecError) else f"rank {rank}: {_first_line(exc)}"


def _first_line(error: BaseException) -> str:
    """``Type: 'first line of the message'`` (quoted, cut short): torch's messages run to many lines."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {quote(lines[0] if lines else '', 120)}"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(path: Path, ctx: DistContext, seed: int, state: TrainerState) -> None:
    """Restore this rank's RNG; on a different world size, reseed deterministically instead."""
    file = path / f"rng-rank-{ctx.rank}.pt"
    if state.world_size == ctx.world_size and file.is_file():
        try:
            saved = torch.load(file, weights_only=True)
        except Exception as error:  # truncated, or not a tensors-only file (weights_only refuses code)
            raise TrecError(f"{file}: not a readable RNG state ({_first_line(error)})") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("torch"), torch.Tensor) \
                or saved["torch"].dtype != torch.uint8:
            raise TrecError(f"{file}: not an RNG state (expected {{'torch': uint8 tensor}})")
        torch.set_rng_state(saved["torch"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    else:
        torch.manual_seed(seed + 1_000_003 * state.step + ctx.rank)


class Checkpointer:
    """Saves and restores a sharded model, its optimizer and the trainer state under one directory."""

    def __init__(self, directory: Path, cfg: CheckpointConfig, ctx: DistContext) -> None:
        self.directory = Path(directory)
        self.cfg = cfg
        self.ctx = ctx

    def discard_incomplete(self) -> None:
        """Remove saves interrupted by a crash (rank 0, before anyone writes)."""
        if self.ctx.is_main and self.directory.is_dir():
            for child in self.directory.glob(".*.tmp"):
                shutil.rmtree(child, ignore_errors=True)
        barrier()

    def save(self, name: str, model: nn.Module, optimizer, state: TrainerState) -> Path:
        """Collectively write checkpoint ``name`` (e.g. ``step-1200`` or ``best``), atomically."""
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        try:
            dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=str(tmp))
            torch.save(_rng_state(), tmp / f"rng-rank-{self.ctx.rank}.pt")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: leave no half-written checkpoint behind
            raise
        barrier()
        if self.ctx.is_main:
            atomic_write_json(tmp / STATE_FILE, asdict(state) | {"world_size": self.ctx.world_size, "complete": True})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        logger.info("checkpoint: saved %s (step %d)", final, state.step)
        return final

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        for old in complete_checkpoints(self.directory)[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer, seed: int) -> TrainerState:
        """Restore model, optimizer (re-sharded to this world size), RNG and trainer state."""
        if not is_complete(path):
            raise TrecError(f"{path}: not a complete checkpoint (missing .metadata or {STATE_FILE})")
        state = read_trainer_state(path)  # checked first: a bad file fails before tensors are read
        optimizer.init_state()  # lazily-created optimizer state must exist to be loaded into
        state_dict = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        load_checkpoint(state_dict, path)
        model.load_state_dict(state_dict["model"])
        optimizer.load_state_dict(state_dict["optimizer"])
        _restore_rng(path, self.ctx, seed, state)
        logger.info("checkpoint: resumed from %s (step %d, saved on %d ranks)", path, state.step, state.world_size)
        return state


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the model's (sharded) weights from a checkpoint, e.g. for evaluation or export."""
    path = Path(path)
    if not is_complete(path):
        raise TrecError(f"{path}: not a complete checkpoint (missing .metadata or {STATE_FILE})")
    state_dict = {"model": model.state_dict()}
    load_checkpoint(state_dict, path)
    model.load_state_dict(state_dict["model"])


def checkpoint_for_inference(run_dir: Path) -> Path:
    """The checkpoint a finished run is evaluated/exported from: ``best`` if any, else the newest."""
    directory = Path(run_dir) / "checkpoints"
    best = directory / BEST
    if is_complete(best):
        return best
    latest = latest_checkpoint(directory)
    if latest is None:
        raise TrecError(f"{directory}: no complete checkpoint (train the run first: trec train --run-dir {run_dir})")
    return latest
