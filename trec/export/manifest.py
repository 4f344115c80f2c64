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
- ``source``: what the caller says the vectors came from (checkpoint, config).

:func:`verify_export` refuses a directory whose files do not match its manifest, naming the file.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from trec.errors import TrecError
from trec.export.layout import EMBEDDINGS_DIR, MANIFEST, shard_files_present
from trec.export.parts import KINDS, part_paths
from trec.io import atomic_write_json, read_json_object, sha256_file

FORMAT_VERSION = 1
_REQUIRED = (
    "format_version", "dimension", "metric", "index_kind", "factory", "num_shards", "shard_files",
    "vectors_per_shard", "num_vectors", "id_mapping", "checksums",
)


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
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise TrecError(f"{MANIFEST}: missing field(s) {', '.join(missing)} in {root}")
    return manifest


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
