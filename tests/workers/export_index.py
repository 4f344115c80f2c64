"""Multi-rank index build: every rank takes its share of ready-made embedding parts and builds.

Rank R copies parts R, R+W, ... of PARTS_DIR into the shared export directory (as if it had
encoded them), then all ranks build the sharded index together, once per index kind.
Usage: ``torchrun --nproc_per_node W tests/workers/export_index.py PARTS_DIR OUT_ROOT KIND [KIND ...]``
writes ``OUT_ROOT/KIND/`` for each kind.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from trec.config import ExportConfig
from trec.distributed import distributed_session
from trec.export import build_sharded_index, export_directory, part_paths


def main() -> None:
    parts_dir, out_root, kinds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    with distributed_session(seed=0, device="cpu") as ctx:
        parts = part_paths(parts_dir, "items")
        for kind in kinds:
            with export_directory(out_root / kind) as tmp:
                for part in parts[ctx.rank :: ctx.world_size]:
                    shutil.copy(part, tmp / "embeddings" / part.name)
                cfg = ExportConfig(index=kind, nprobe=4, pq_m=8, pq_nbits=6)
                manifest = build_sharded_index(tmp, cfg, source={"worker": "export_index", "world_size": ctx.world_size})
            print(f"rank {ctx.rank}: {kind} {manifest['factory']} shards={manifest['vectors_per_shard']}")


if __name__ == "__main__":
    main()
