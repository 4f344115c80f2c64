"""The export directory: its file names, and its atomic creation by every rank together.

::

    OUT/
      manifest.json                      written last, by rank 0 (see trec.export.manifest)
      embeddings/items-part-R.parquet    one per exporting rank (and users-part-R.parquet)
      index/shard-K.faiss                FAISS's own format; item with index i is in shard i % S
      index/ids.parquet                  item index → raw item ID, sorted by index
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from trec.errors import TrecError
from trec.distributed import barrier
from trec.export.comm import broadcast_bytes, group_rank_world
from trec.io import atomic_directory, discard_interrupted

MANIFEST = "manifest.json"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
IDS_FILE = f"{INDEX_DIR}/ids.parquet"
_SHARD_RE = re.compile(r"^shard-(\d+)\.faiss$")


def shard_file(shard: int) -> str:
    """Path of shard ``shard`` relative to the export directory."""
    return f"{INDEX_DIR}/shard-{shard}.faiss"


def shard_files_present(root: Path) -> list[str]:
    """Relative paths of every ``index/shard-*.faiss`` actually in ``root``."""
    index_dir = Path(root) / INDEX_DIR
    if not index_dir.is_dir():
        return []
    return sorted(f"{INDEX_DIR}/{p.name}" for p in index_dir.iterdir() if _SHARD_RE.match(p.name))


@contextlib.contextmanager
def export_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Collective: every rank enters; all write into one temporary directory that appears as ``out_dir`` at the end.

    Rank 0 creates ``.OUT.XXXX.tmp`` beside ``out_dir`` (with ``embeddings/`` and ``index/``)
    and sends its path to the other ranks, so all ranks must see the same filesystem (one
    machine, or a shared volume). When the block ends on every rank, rank 0 renames the
    directory into place after a barrier, and a second barrier lets every rank read the result.
    If the block raises on rank 0 the temporary directory is deleted; if it raises elsewhere,
    the launcher (torchrun) stops the job and no ``out_dir`` is ever created. ::

        with export_directory(args.out) as tmp:
            write_embedding_part(part_path(tmp / "embeddings", "items", rank), raw_ids, indices, vectors)
            build_sharded_index(tmp, cfg.export, normalized=True, source={...})

    A restarted export (after a crash or a torchrun restart) starts clean: rank 0 first deletes
    the temporary directories an interrupted attempt left beside ``out_dir``, so attempts never mix.
    """
    rank, _ = group_rank_world()
    out_dir = Path(out_dir)
    if rank != 0:
        message = broadcast_bytes(None).decode()
        if message.startswith("error:"):
            raise TrecError(message[len("error:") :])
        yield Path(message[len("path:") :])
        barrier()  # everyone is done writing: rank 0 renames now
        barrier()  # the final directory exists
        return
    if out_dir.exists() and not overwrite:
        message = f"{out_dir}: already exists; choose another output directory or allow overwriting it"
        broadcast_bytes(f"error:{message}".encode())
        raise TrecError(message)
    discard_interrupted(out_dir)  # an export that died before its rename
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / EMBEDDINGS_DIR).mkdir()
        (tmp / INDEX_DIR).mkdir()
        broadcast_bytes(f"path:{tmp.resolve()}".encode())
        yield tmp
        barrier()
    barrier()
