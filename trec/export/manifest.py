"""``manifest.json`` of an export: what the index is, where its files are, and their checksums.

Fields (format_version 1):

- ``format_version``, ``created`` (UTC, ISO 8601), ``versions`` ({trec, faiss, torch});
- ``dimension`` D, ``metric`` (always ``"inner_product"``), ``normalized`` (vectors are unit
  length, so inner product = cosine);
- ``index_kind``, ``factory`` (FAISS factory string, built with METRIC_INNER_PRODUCT),
  ``params`` (resolved build parameters), ``search_defaults`` (nprobe / ef_search stored in
  the shards), ``training`` ({sample, seed}: the vectors that trained the shared quantizer);
- ``num_shards``, ``shard_files``, ``vectors_per_shard``, ``num_vectors``, ``sharding``
  (the rule placing an item in a shard);
- ``id_mapping``: FAISS ids are item indices; ``index/ids.parquet`` maps them to raw IDs;
- ``embeddings``: the parts per kind (items, users) with their row counts;
- ``checksums``: SHA-256 of every other file in the directory, by relative path;
- ``source``: what the caller says the vectors came from. ``trec export`` records the binding
  (``run_id``, ``run_dir``, ``checkpoint_name``, ``step``, ``dataset_fingerprint``) beside the
  checkpoint, config and dataset paths; ``trec search``, ``trec evaluate --index`` and two-stage
  retrieval through the index refuse it for another run, checkpoint or dataset
  (:func:`trec.runs.check_index_binding`).

:func:`verify_export` refuses a directory whose files do not match its manifest, naming the file.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from trec.errors import TrecError
from trec.export.layout import EMBEDDINGS_DIR, MANIFEST, shard_files_present
from trec.export.parts import KINDS, part_paths
from trec.io import JsonField, atomic_write_json, check_json_fields, path_inside, quote, read_json_object, sha256_file

FORMAT_VERSION = 1
METRIC = "inner_product"
"""The only similarity an export is built and searched with (FAISS METRIC_INNER_PRODUCT)."""
_FILE = JsonField(str)
_COUNT = JsonField(int, minimum=0)
# Every field of format_version 1 with its JSON type (see the module docstring); a new field is
# one more line here. Fields not listed are ignored by the reader.
_FIELDS = {
    "format_version": JsonField(int),
    "created": JsonField(str, required=False),
    "versions": JsonField(dict, required=False),
    "dimension": JsonField(int, minimum=1),
    "metric": JsonField(str),
    "normalized": JsonField(bool, required=False),
    "index_kind": JsonField(str),
    "factory": JsonField(str),
    "params": JsonField(dict),
    "search_defaults": JsonField(dict, required=False),
    "training": JsonField(dict, nullable=True, required=False),
    "num_shards": JsonField(int, minimum=1),
    "shard_files": JsonField(list, items=_FILE),
    "vectors_per_shard": JsonField(list, items=_COUNT),
    "num_vectors": _COUNT,
    "sharding": JsonField(dict, required=False),
    "id_mapping": JsonField(dict),
    "embeddings": JsonField(dict, required=False),
    "checksums": JsonField(dict),
    "source": JsonField(dict, required=False),
}
_TEXT = JsonField(str, required=False)
_SOURCE_TEXT = JsonField(str, nullable=True, required=False)  # null: unknown (a run made before run.json)
# The objects inside it, by field name (their own fields are all optional: older exports lack some).
_NESTED_FIELDS = {
    "id_mapping": {"file": _TEXT, "faiss_id": _TEXT, "columns": JsonField(list, items=_FILE, required=False),
                   "raw_id_type": _TEXT, "parts": _TEXT},
    "sharding": {"rule": _TEXT, "num_shards": JsonField(int, minimum=1, required=False)},
    "training": {"sample": JsonField(int, minimum=0, required=False), "seed": JsonField(int, required=False)},
    "versions": {"trec": _TEXT, "faiss": _TEXT, "torch": _TEXT},
    # source is what the caller says (any JSON); these are the fields the run binding reads.
    "source": {name: _SOURCE_TEXT for name in ("run_id", "run_dir", "checkpoint_name", "dataset_fingerprint")}
              | {"step": JsonField(int, minimum=0, nullable=True, required=False)},
}
_EMBEDDING_FIELDS = {"parts": JsonField(list, items=_FILE), "rows": JsonField(list, items=_COUNT),
                     "dimension": JsonField(int, minimum=1)}
_SEARCH_DEFAULT = JsonField(int, minimum=1)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _short(digest: str) -> str:
    return digest[:12]


def checksum_files(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` except the manifest and hidden temporary files."""
    root = Path(root)
    sums = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and relative != MANIFEST and not any(p.startswith(".") for p in relative.split("/")):
            sums[relative] = sha256_file(path)
    return sums


def write_manifest(root: Path, fields: dict) -> dict:
    """Write ``root/manifest.json``: ``fields`` plus format version, creation time and checksums."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "checksums": checksum_files(root),
    }
    atomic_write_json(Path(root) / MANIFEST, manifest)
    return manifest


def read_manifest(root: Path) -> dict:
    """Parse ``root/manifest.json`` and check it has every field this version reads."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise TrecError(f"{MANIFEST}: not found in {root}")
    manifest = read_json_object(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TrecError(
            f"{MANIFEST}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this trec reads {FORMAT_VERSION}) in {root}"
        )
    where = str(path)
    check_json_fields(manifest, _FIELDS, where)
    for field, fields in _NESTED_FIELDS.items():
        if manifest.get(field) is not None:
            check_json_fields(manifest[field], fields, f"{where}: {field}")
    for kind, listing in (manifest.get("embeddings") or {}).items():
        if not isinstance(listing, dict):
            raise TrecError(f"{where}: field 'embeddings.{kind}' must be an object, got {quote(listing)}")
        check_json_fields(listing, _EMBEDDING_FIELDS, f"{where}: embeddings.{kind}")
    for name, value in (manifest.get("search_defaults") or {}).items():
        if not _SEARCH_DEFAULT.accepts(value):
            raise TrecError(f"{where}: field 'search_defaults.{name}' must be {_SEARCH_DEFAULT.describe()}, "
                            f"got {quote(value)}")
    if manifest["metric"] != METRIC:  # the index is searched by inner product whatever the file says
        raise TrecError(f"{where}: field 'metric' must be {METRIC!r}, got {quote(manifest['metric'])}")
    for name, digest in manifest["checksums"].items():
        if not (isinstance(digest, str) and _SHA256.match(digest)):
            raise TrecError(f"{where}: checksum of {quote(name)} must be 64 hex digits, got {quote(digest)}")
    for name in _listed_files(manifest):
        path_inside(root, name, where)
    return manifest


def _listed_files(manifest: dict) -> list[str]:
    """Every path the manifest names, relative to the export directory."""
    names = [*manifest["shard_files"], *manifest["checksums"]]
    if manifest["id_mapping"].get("file"):
        names.append(manifest["id_mapping"]["file"])
    for listing in (manifest.get("embeddings") or {}).values():
        names += listing["parts"]
    return names


def _unlisted_parts(root: Path, listed: set[str]) -> list[str]:
    found = []
    for kind in KINDS:
        try:
            paths = part_paths(root / EMBEDDINGS_DIR, kind)
        except TrecError:  # no parts of this kind
            continue
        found += [p.relative_to(root).as_posix() for p in paths]
    return [name for name in found if name not in listed]


def verify_export(root: Path, manifest: dict, checksums: bool = True) -> None:
    """Refuse (TrecError naming the file) an export whose files do not match ``manifest``.

    Always: every listed shard exists, and no shard or embedding part is present that the
    manifest does not list (a leftover of another export would silently change results).
    With ``checksums``: every listed file exists with the recorded SHA-256.
    """
    root = Path(root)
    sums: dict = manifest["checksums"]
    listed_shards = list(manifest["shard_files"])
    if len(listed_shards) != manifest["num_shards"]:
        raise TrecError(f"{MANIFEST}: num_shards is {manifest['num_shards']} but {len(listed_shards)} shard files are listed")
    counts = manifest["vectors_per_shard"]
    if len(counts) != len(listed_shards) or sum(counts) != manifest["num_vectors"]:
        raise TrecError(f"{MANIFEST}: vectors_per_shard {quote(counts)} does not give num_vectors "
                        f"{manifest['num_vectors']} over {len(listed_shards)} shards")
    for name in listed_shards:
        if not (root / name).is_file():
            raise TrecError(f"{name}: missing")
        if name not in sums:
            raise TrecError(f"{name}: no checksum in {MANIFEST}")
    mapping = manifest["id_mapping"].get("file")
    if mapping and not (root / mapping).is_file():
        raise TrecError(f"{mapping}: missing")
    for name in shard_files_present(root):
        if name not in listed_shards:
            raise TrecError(f"{name}: not listed in {MANIFEST} (left over from another export?)")
    for name in _unlisted_parts(root, set(sums)):
        raise TrecError(f"{name}: not listed in {MANIFEST} (left over from another export?)")
    if not checksums:
        return
    for name, expected in sorted(sums.items()):
        path = root / name
        if not path.is_file():
            raise TrecError(f"{name}: missing")
        actual = sha256_file(path)
        if actual != expected:
            raise TrecError(
                f"{name}: checksum mismatch (manifest says {_short(expected)}, file has {_short(actual)})"
            )
