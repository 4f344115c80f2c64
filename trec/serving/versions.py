"""A model root: published copies of exports, and a pointer to the one that serving loads.

::

    DIR/versions/<name>/                 a complete copy of an export directory (bundle/, index/, manifest.json)
    DIR/versions/<name>/published.json   provenance: name, published, source, bundle_version, retriever,
                                         ranker, bundle_manifest_sha256
    DIR/CURRENT                          {"version": name, "updated": ISO time}, replaced atomically

    version = publish("exports/tt", "models", make_current=True)   # verified, copied to models/versions/v0001
    set_current("models", "v0001")                                 # roll back or forward
    Recommender.load(current_path("models"))                       # the version directory, like an export

A published version is never changed again: its files may be hard links to the export's, so
neither the export nor the version may be edited in place afterwards (re-export into a new
directory and publish that). Readers of ``CURRENT`` see the old or the new pointer, never a part.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from trec.errors import TrecError
from trec.export.manifest import read_manifest, verify_export
from trec.io import (JsonField, atomic_directory, atomic_write_json, check_json_fields, quote, read_json_object,
                     sha256_file)
from trec.serving.bundle import BUNDLE_DIR, MANIFEST, RANKER, RETRIEVER, bundle_root, read_bundle_manifest

VERSIONS_DIR = "versions"
CURRENT_FILE = "CURRENT"
PROVENANCE_FILE = "published.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEFAULT_NAME = re.compile(r"v(\d{4,})")
_LOCK_FILE = ".publish.lock"
_CURRENT_FIELDS = {"version": JsonField(str), "updated": JsonField(str)}
_PROVENANCE_FIELDS = {"name": JsonField(str), "published": JsonField(str), "source": JsonField(str),
                      "bundle_version": JsonField(str), RETRIEVER: JsonField(dict),
                      RANKER: JsonField(dict, nullable=True), "bundle_manifest_sha256": JsonField(str)}


@dataclass(frozen=True)
class Version:
    """One published version: its directory (load it like an export) and its ``published.json``."""

    name: str
    path: Path
    provenance: dict
    is_current: bool

    @property
    def bundle_version(self) -> str:
        return self.provenance["bundle_version"]


def publish(export: str | os.PathLike, root: str | os.PathLike, name: str | None = None,
            make_current: bool = False) -> Version:
    """Verify ``export`` (every checksum of its bundle and its index) and copy it to ``root/versions/NAME``.

    ``name`` defaults to the next ``v0001``, ``v0002``, ...; an existing name is refused. Nothing is
    written before the export is verified, and the version appears complete or not at all (built
    in a temporary directory, then renamed). Files are hard-linked where the export is on the same
    filesystem (else copied): both are immutable from now on. ``make_current`` points CURRENT at it.
    """
    root = Path(root)
    if name is not None:
        _check_new(root, check_name(name, root))  # before the (slow) verification
    source = bundle_root(export).parent.resolve()
    if root.resolve().is_relative_to(source):
        raise TrecError(f"{root}: the model root must not be inside the export {source}")
    # The bundle's structure here; its files' hashes once, below: the export's checksums cover bundle/ too.
    bundle = read_bundle_manifest(source / BUNDLE_DIR, verify=False)
    try:
        verify_export(source, read_manifest(source), checksums=True)
    except TrecError as error:  # its messages name the file relative to the export
        raise TrecError(f"{source}: {error}; not published") from None
    root.mkdir(parents=True, exist_ok=True)
    with _publish_lock(root):  # two publishers would pick the same default name
        name = _next_name(root) if name is None else name
        final = _check_new(root, name)
        provenance = {"name": name, "published": _now(), "source": str(source), "bundle_version": bundle["version"],
                      RETRIEVER: bundle[RETRIEVER], RANKER: bundle[RANKER],
                      "bundle_manifest_sha256": sha256_file(source / BUNDLE_DIR / MANIFEST)}
        with atomic_directory(final) as tmp:
            _link_tree(source, tmp)
            atomic_write_json(tmp / PROVENANCE_FILE, provenance)
    if make_current:
        set_current(root, name)
    return Version(name, final, provenance, make_current)


def set_current(root: str | os.PathLike, name: str) -> Version:
    """Point ``root/CURRENT`` at the published version ``name`` (replaced atomically)."""
    root = Path(root)
    version = _read_version(root, check_name(name, root), is_current=True)
    atomic_write_json(root / CURRENT_FILE, {"version": name, "updated": _now()})
    return version


def current_name(root: str | os.PathLike) -> str:
    """The version ``root/CURRENT`` names; refused (one line) when CURRENT is missing, malformed or dangling."""
    root = _model_root(root)
    path = root / CURRENT_FILE
    if not path.is_file():
        raise TrecError(f"{path}: no current version; run `trec publish EXPORT --model-root {root} --current`")
    pointer = read_json_object(path)
    check_json_fields(pointer, _CURRENT_FIELDS, str(path))
    name = pointer["version"]
    if not _NAME.fullmatch(name):
        raise TrecError(f"{path}: field 'version' is not a version name, got {quote(name)}")
    if not (_versions_dir(root) / name / PROVENANCE_FILE).is_file():
        raise TrecError(f"{path}: names version {name!r}, which is not in {_versions_dir(root)} "
                        f"(trec publish --model-root {root} --set-current NAME)")
    return name


def current_path(root: str | os.PathLike) -> Path:
    """The directory of the current version: what serving loads (an export directory)."""
    return _versions_dir(Path(root)) / current_name(root)


def version_path(root: str | os.PathLike, name: str) -> Path:
    """The directory of the published version ``name`` (an export directory); one line when it is not there."""
    root = _model_root(root)
    return _read_version(root, check_name(name, root), is_current=False).path


def versions(root: str | os.PathLike) -> list[Version]:
    """Every published version of ``root``, by name."""
    root = _model_root(root)
    current = current_name(root) if (root / CURRENT_FILE).exists() else None
    found = [entry.name for entry in _versions_dir(root).iterdir()
             if entry.is_dir() and not entry.name.startswith(".")]  # skip publishes under way
    return [_read_version(root, name, name == current) for name in sorted(found)]


def pointer_stamp(root: str | os.PathLike) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of ``root/CURRENT``, None without one: cheap to poll, and it changes whenever
    CURRENT is replaced (each write is a new file). Compare :func:`current_name` when it does."""
    try:
        stat = os.stat(Path(root) / CURRENT_FILE)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def check_name(name: str, root: str | os.PathLike = "") -> str:
    """``name`` if it is a version name (letters, digits, ``._-``; no path), else one TrecError line."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TrecError(f"{Path(root) / VERSIONS_DIR}: {quote(name)} is not a version name "
                        f"(1-64 letters, digits, '.', '_' or '-', starting with a letter or digit)")
    return name


def _model_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not _versions_dir(root).is_dir():
        raise TrecError(f"{root}: not a model root (no {VERSIONS_DIR}/ directory); run "
                        f"`trec publish EXPORT --model-root {root} --current`")
    return root


def _versions_dir(root: Path) -> Path:
    return root / VERSIONS_DIR


def _read_version(root: Path, name: str, is_current: bool) -> Version:
    path = _versions_dir(_model_root(root)) / name
    provenance_path = path / PROVENANCE_FILE
    if not provenance_path.is_file():
        raise TrecError(f"{path}: no published version {name!r} (see trec publish --model-root {root} --list)")
    provenance = read_json_object(provenance_path)
    check_json_fields(provenance, _PROVENANCE_FIELDS, str(provenance_path))
    return Version(name, path, provenance, is_current)


def _check_new(root: Path, name: str) -> Path:
    final = _versions_dir(root) / name
    if final.exists():
        raise TrecError(f"{final}: version {name!r} already exists (publish under another --name)")
    return final


def _next_name(root: Path) -> str:
    directory = _versions_dir(root)
    numbers = [int(match.group(1)) for entry in (directory.iterdir() if directory.is_dir() else ())
               if (match := _DEFAULT_NAME.fullmatch(entry.name))]
    return f"v{max(numbers, default=0) + 1:04d}"


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link (or, across filesystems, copy) every file of ``source`` into ``target``; hidden
    leftovers and a ``published.json`` of the source (a version published again) stay behind."""
    link = True
    for directory, subdirs, files in os.walk(source):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        relative = Path(directory).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.startswith(".") or (relative == Path(".") and name == PROVENANCE_FILE):
                continue
            src, dst = Path(directory) / name, target / relative / name
            if link:
                try:
                    os.link(src, dst)
                    continue
                except OSError:  # another filesystem (EXDEV) or one without hard links
                    link = False
            shutil.copy2(src, dst)


@contextlib.contextmanager
def _publish_lock(root: Path) -> Iterator[None]:
    with open(root / _LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
