"""A servable bundle, loaded: single-process models, request-time tables and the export's index.

    bundle = Bundle.load(EXPORT)                      # or EXPORT/bundle; checksums verified
    vectors = bundle.user_vectors(np.array([0, 5]))   # 2 X D float32: the retriever's user tower
    logits = bundle.rank_scores(users, items)         # (M,) ranker click logits

Loading needs no process group, no DistributedModelParallel and no prepared dataset directory:
the models are built unsharded on the CPU from the bundle's config.yaml and weights.pt
(``torch.load(weights_only=True)``: no pickle runs), and every request-time table comes from
``bundle/tables`` (layout: :mod:`trec.export.bundle`, :mod:`trec.data.tables`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trec.config import TrecConfig
from trec.data import Csr, PreparedDataset
from trec.data.tables import read_seen
from trec.errors import TrecError
from trec.export.bundle import (BUNDLE_DIR, CONFIG_FILE, FORMAT_VERSION, MANIFEST, RANKER, RETRIEVER, TABLES_DIR,
                                WEIGHTS_FILE, load_task_tensors, unsharded_task)
from trec.export.search import ShardedIndex
from trec.io import JsonField, check_json_fields, path_inside, quote, read_json_object, sha256_file
from trec.models import Retriever, load_config, retriever_of

_BINDING = {"run_id": JsonField(str, nullable=True), "run_dir": JsonField(str), "checkpoint_name": JsonField(str),
            "step": JsonField(int, minimum=0), "dataset_fingerprint": JsonField(str), "model": JsonField(str)}
_FIELDS = {"format_version": JsonField(int), "created": JsonField(str, required=False), "version": JsonField(str),
           RETRIEVER: JsonField(dict), RANKER: JsonField(dict, nullable=True), "files": JsonField(dict)}
_FILE_FIELDS = {"bytes": JsonField(int, minimum=0), "sha256": JsonField(str)}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def bundle_root(path: str | Path) -> Path:
    """The bundle directory of an export directory, or ``path`` itself when it is one."""
    path = Path(path)
    if (path / BUNDLE_DIR / MANIFEST).is_file():
        return path / BUNDLE_DIR
    if path.name == BUNDLE_DIR and (path / MANIFEST).is_file():
        return path
    raise TrecError(f"{path}: no servable bundle ({BUNDLE_DIR}/{MANIFEST} not found); export the run again "
                    "with this trec (trec export --run-dir RUN --out DIR)")


def read_bundle_manifest(root: Path, verify: bool = True) -> dict:
    """``root/manifest.json``, type-checked; every listed file present (and with ``verify`` its SHA-256
    matching), each failure one TrecError line naming the file."""
    where = f"{root / MANIFEST}"
    manifest = read_json_object(root / MANIFEST)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TrecError(f"{where}: format_version {quote(manifest.get('format_version'))} is not supported "
                        f"(this trec reads {FORMAT_VERSION}); export the run again")
    check_json_fields(manifest, _FIELDS, where)
    for name in (RETRIEVER, RANKER):
        if manifest[name] is not None:
            check_json_fields(manifest[name], _BINDING, f"{where}: {name}")
    for relative, entry in sorted(manifest["files"].items()):
        path = path_inside(root, relative, where)
        if not isinstance(entry, dict):
            raise TrecError(f"{where}: field 'files.{relative}' must be an object, got {quote(entry)}")
        check_json_fields(entry, _FILE_FIELDS, f"{where}: files.{relative}")
        if not _SHA256.match(entry["sha256"]):
            raise TrecError(f"{where}: checksum of {quote(relative)} must be 64 hex digits")
        if not path.is_file():
            raise TrecError(f"{path}: missing (listed in {where}); export the run again")
        if verify and (path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]):
            raise TrecError(f"{path}: checksum mismatch (the file changed after `trec export`); export the run again")
    needed = [f"{RETRIEVER}/{CONFIG_FILE}", f"{RETRIEVER}/{WEIGHTS_FILE}", f"{TABLES_DIR}/{MANIFEST}"]
    if manifest[RANKER] is not None:
        needed += [f"{RANKER}/{CONFIG_FILE}", f"{RANKER}/{WEIGHTS_FILE}"]
    for relative in needed:
        if relative not in manifest["files"]:
            raise TrecError(f"{where}: {relative} is not listed (an incomplete bundle); export the run again")
    return manifest


def _load_model(directory: Path, tables: PreparedDataset) -> tuple[TrecConfig, nn.Module]:
    """(config, task in eval mode on the CPU) of ``directory``'s config.yaml and weights.pt."""
    cfg = load_config(directory / CONFIG_FILE)  # safe YAML, checked against the config schema
    task = unsharded_task(cfg, tables)
    load_task_tensors(task, directory / WEIGHTS_FILE)
    return cfg, task.eval()


@dataclass
class Bundle:
    """A loaded bundle (see the module docstring); every tensor on the CPU, models in eval mode."""

    root: Path
    manifest: dict
    tables: PreparedDataset
    """The request-time tables (build_batch, lookup_index, raw_ids, item_titles, features, item_counts)."""
    seen: Csr
    """user index → items of every split (what exclude_seen removes)."""
    positive_users: np.ndarray
    """(U,) bool: users with a positive training row (label >= data.positive_threshold): the tower
    personalises them; the others are cold users."""
    index: ShardedIndex
    retriever_config: TrecConfig
    retriever_task: nn.Module
    ranker_config: TrecConfig | None
    ranker: nn.Module | None
    """The unsharded ranker task (e.g. the dcn RankingTask), or None."""

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Load the bundle of the export at ``path`` (or the bundle directory itself).

        ``verify`` checks every file's SHA-256 (the bundle's and the index's). A missing,
        changed or malformed file is one TrecError line naming it.
        """
        root = bundle_root(path)
        manifest = read_bundle_manifest(root, verify)
        tables_dir = root / TABLES_DIR
        tables_manifest = read_json_object(tables_dir / MANIFEST)
        threshold = tables_manifest.get("positive_threshold")
        tables = PreparedDataset.open(tables_dir, **({"positive_threshold": threshold} if threshold is not None else {}))
        seen, positive_users = read_seen(tables_dir, tables.num_users, tables.num_items)
        retriever_config, retriever_task = _load_model(root / RETRIEVER, tables)
        if retriever_of(retriever_task) is None:
            raise TrecError(f"{root / RETRIEVER / CONFIG_FILE}: model.name '{retriever_config.model.name}' does "
                            "not retrieve (a model with a retriever is needed)")
        ranker_config, ranker = (None, None)
        if manifest[RANKER] is not None:
            ranker_config, ranker = _load_model(root / RANKER, tables)
        index = ShardedIndex.load(root.parent, verify=verify)
        index.check_catalog(tables.num_items, str(tables_dir))
        return cls(root, manifest, tables, seen, positive_users, index, retriever_config, retriever_task,
                   ranker_config, ranker)

    @property
    def retriever(self) -> Retriever:
        """The unsharded :class:`~trec.models.Retriever` (encode_users, encode_items, normalized)."""
        return retriever_of(self.retriever_task)

    @property
    def version(self) -> str:
        """``<run_id[:12]>@<checkpoint>-<step>`` of the retrieval run."""
        return self.manifest["version"]

    @property
    def configs(self) -> dict[str, TrecConfig | None]:
        return {RETRIEVER: self.retriever_config, RANKER: self.ranker_config}

    @torch.no_grad()
    def user_vectors(self, users: np.ndarray) -> np.ndarray:
        """R X D float32 user-tower vectors of ``users`` ((R,) user indices; -1: a row without user features),
        over the stored features and history, as `trec export --users` encodes them."""
        users = np.asarray(users, dtype=np.int64)
        data = self.retriever_config.data
        batch = self.tables.build_batch(users, np.full(len(users), -1, np.int64), np.zeros(len(users), np.float32),
                                        history_max_len=data.history_max_len)
        return self.retriever.encode_users(batch).float().numpy()

    @torch.no_grad()
    def rank_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(M,) float32 click logits of the ranker for the (user, item) rows ((M,) indices each)."""
        if self.ranker is None:
            raise TrecError(f"{self.root}: the bundle has no ranker (export with --ranker-run-dir RANKER)")
        from trec.models.dcn.model import ranker_scorer

        score = ranker_scorer(self.ranker, self.tables, self.ranker_config.data.history_max_len, torch.device("cpu"))
        return score(np.asarray(users, np.int64), np.asarray(items, np.int64)).float().numpy()
