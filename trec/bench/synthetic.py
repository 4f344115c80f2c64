"""The synthetic datasets the benchmarks prepare once and reuse."""

from __future__ import annotations

import time
from pathlib import Path

from trec.config import PrepareConfig


def cached_synthetic_dataset(out: Path, options: PrepareConfig) -> Path:
    """``out``, prepared from ``options.synthetic`` unless an earlier benchmark run left it there."""
    out = Path(out)
    if (out / "manifest.json").is_file():
        return out
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources.synthetic import SyntheticSource

    synthetic = options.synthetic
    print(f"preparing a synthetic dataset ({synthetic.interactions:,} interactions, {synthetic.users:,} users, "
          f"{synthetic.items:,} items) in {out} (reused next time)", flush=True)
    started = time.perf_counter()
    prepare_dataset(SyntheticSource(synthetic, options.seed, options.rows_per_shard), out, options, overwrite=True)
    print(f"  prepared in {time.perf_counter() - started:.1f} s", flush=True)
    return out
