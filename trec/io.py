"""Atomic file and directory writes: outputs appear complete under their final name, or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` to write; rename it to ``path`` when the block succeeds.

    Readers see the whole file under its final name or none; on an exception the temporary file
    is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name that the writer creates itself, so the file gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flushed to disk, and rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: Path, payload: object) -> None:
    atomic_write_text(Path(path), json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json_object(path: Path) -> dict:
    """Parse a JSON file that must hold an object; a bad file is a TrecError naming it and the line."""
    from trec.errors import TrecError

    path = Path(path)
    try:
        # NaN/Infinity stay readable (trec's own metrics.json may hold a NaN metric); fields whose
        # value must be finite say so in their JsonField.
        payload = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise TrecError(f"{path}: invalid JSON (line {error.lineno}: {error.msg})") from None
    except UnicodeDecodeError as error:
        raise TrecError(f"{path}: invalid JSON (not UTF-8 text at byte {error.start})") from None
    except RecursionError:
        raise TrecError(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError as error:  # a duplicate key, an integer of too many digits
        raise TrecError(f"{path}: invalid JSON ({str(error)[:200]})") from None
    if not isinstance(payload, dict):
        raise TrecError(f"{path}: expected a JSON object")
    return payload


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose key appears twice is ambiguous (json keeps the last one silently)."""
    payload = dict(pairs)
    if len(payload) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {quote(key)}")
            seen.add(key)
    return payload


@contextlib.contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; rename it to ``final`` when the block succeeds.

    On an exception the temporary directory is removed, so no half-written output is left under
    the final name. With ``overwrite`` an existing ``final`` is replaced (after the new one is
    complete); otherwise an existing ``final`` is an error raised before any work is done.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; the output is for readers too (serving, TensorBoard)
    try:
        yield tmp
        if final.exists():
            trash = final.with_name(f".{final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def discard_interrupted(final: Path) -> list[Path]:
    """Remove the temporary directories :func:`atomic_directory` left beside ``final`` when the
    process writing them was killed before its rename; returns what was removed.

    Only directories of exactly that pattern (``.NAME.XXXXXXXX.tmp``, mkdtemp's random part has
    no dot) go, so another output's (``.NAME.v2.XXXXXXXX.tmp`` belongs to ``NAME.v2``) stays. Call
    it only where no other writer of ``final`` can be running.
    """
    final = Path(final)
    own = re.compile(rf"\.{re.escape(final.name)}\.[A-Za-z0-9_]+\.tmp")
    removed = []
    if final.parent.is_dir():
        for stale in final.parent.iterdir():
            if own.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (for manifests' checksums)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# reading files back: declared field types, paths that stay inside their directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JsonField:
    """The declared type of one field of a JSON file trec reads back (manifest, trainer state).

    ``kind`` is int, float, str, bool, list or dict. A bool never counts as a number (JSON
    ``true`` is not 1), an int is accepted where a float is declared, and floats must be finite.
    ``minimum`` bounds a number; ``items`` declares every element of a list; ``nullable`` admits
    ``null``; a field that is not ``required`` may be absent.
    """

    kind: type
    minimum: float | None = None
    items: "JsonField | None" = None
    nullable: bool = False
    required: bool = True

    def accepts(self, value: object) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or self.kind is bool:
            return isinstance(value, bool) and self.kind is bool
        if self.kind is float:
            ok = isinstance(value, (int, float)) and math.isfinite(value)
        else:
            ok = isinstance(value, self.kind)
        return ok and (self.minimum is None or value >= self.minimum)

    def describe(self) -> str:
        noun = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
                list: "a list", dict: "an object"}.get(self.kind, self.kind.__name__)
        bound = f" >= {self.minimum:g}" if self.minimum is not None else ""
        return f"{noun}{bound}{' or null' if self.nullable else ''}"


def check_json_fields(payload: dict, fields: dict[str, JsonField], where: str, allow_unknown: bool = True) -> None:
    """Refuse (TrecError naming ``where`` and the field) a value that is absent or not of its declared type.

    ``allow_unknown=False`` also refuses fields that ``fields`` does not declare.
    """
    from trec.errors import TrecError

    for name, spec in fields.items():
        if name not in payload:
            if spec.required:
                raise TrecError(f"{where}: missing field '{name}'")
            continue
        _check_json_value(payload[name], spec, where, name)
    unknown = sorted(str(name) for name in payload if name not in fields)
    if unknown and not allow_unknown:
        raise TrecError(f"{where}: unknown field {quote(unknown[0])} (expected only {', '.join(fields)})")


def _check_json_value(value: object, spec: JsonField, where: str, name: str) -> None:
    from trec.errors import TrecError

    if not spec.accepts(value):
        raise TrecError(f"{where}: field '{name}' must be {spec.describe()}, got {quote(value)}")
    if spec.items is not None and value is not None:
        for position, item in enumerate(value):
            _check_json_value(item, spec.items, where, f"{name}[{position}]")


def quote(value: object, limit: int = 100) -> str:
    """``repr(value)``, cut to about ``limit`` characters: an error quotes a bad value, never a whole file."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def path_inside(root: Path, relative: object, where: str) -> Path:
    """``root / relative`` for a path read from a file, refused unless it stays inside ``root``.

    Refused (TrecError naming ``where``): a non-string, an empty or absolute path, a ``..``
    component, or a path that resolves (through symlinks) outside ``root``.
    """
    from trec.errors import TrecError

    if not isinstance(relative, str) or not relative or "\\" in relative or "\0" in relative:
        raise TrecError(f"{where}: {quote(relative)} is not a relative file path")
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise TrecError(f"{where}: path {quote(relative)} leaves the directory (absolute or '..')")
    path = Path(root) / relative
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise TrecError(f"{where}: {quote(relative)} resolves outside {root} (a symlink out of the directory)")
    return path


def streaming_parquet(path: str | Path):
    """A ``pyarrow.parquet.ParquetFile`` to read once, front to back, in batches or row groups.

    Without read-ahead (``pre_buffer=False``): with Arrow's default, every row group read through
    the file keeps its compressed bytes cached until the file is closed, so one pass over a file
    held all of it by its end (about 10 bytes per interaction in `trec data prepare`'s passes).
    Local files gain nothing from it.
    """
    import pyarrow.parquet as pq  # here, so that `trec --help` does not load Arrow

    return pq.ParquetFile(path, pre_buffer=False)
