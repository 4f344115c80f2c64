"""A finished training run, loaded for inference: its config, dataset and sharded model.

Used by every command that reads a run (`trec evaluate`, `trec export`, `trec search`,
`trec recommend`): the run's own config.yaml says how to rebuild the model, and its best (or
newest) complete checkpoint is loaded into it, re-sharded for the current world size.

Runs are bound to their data: the first start writes ``RUN/run.json`` (a run ID and the
fingerprint of the prepared dataset it trains on, see :func:`dataset_fingerprint`), and every
load of the run (:func:`load_trained_run`) refuses a dataset whose fingerprint differs. An
export records the run ID, checkpoint and dataset fingerprint it came from, and
:func:`check_index_binding` refuses it for any other run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from torch import nn

from trec.checkpoint import (TrainerState, checkpoint_for_inference, latest_checkpoint, load_model_weights,
                             read_trainer_state)
from trec.config import TrecConfig, config_to_dict, save_config
from trec.data import PreparedDataset
from trec.distributed import DistContext, shard_model
from trec.errors import TrecError
from trec.io import atomic_write_json, read_json_object
from trec.models import RetrieverRun, Retriever, load_config, model_spec, retriever_of
from trec.optim import attach_sparse_optimizer

logger = logging.getLogger("trec")

RUN_RECORD = "run.json"


@dataclass(frozen=True)
class RunDir:
    """Where a training run writes: config.yaml, run.json, checkpoints/, tb/, metrics.json."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def record(self) -> Path:
        """run.json: the run's ID and the dataset it is bound to (:func:`write_run_record`)."""
        return self.root / RUN_RECORD

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def merge_metrics(self, metrics: dict[str, object], prefix: str = "") -> None:
        """Add ``metrics`` (keys prefixed) to metrics.json, keeping the keys it already has."""
        previous = read_json_object(self.metrics) if self.metrics.is_file() else {}
        atomic_write_json(self.metrics, previous | {prefix + key: value for key, value in metrics.items()})


def build_sharded_task(cfg: TrecConfig, dataset: PreparedDataset, ctx: DistContext, train: bool) -> tuple[nn.Module, nn.Module]:
    """(DMP-wrapped task, the unwrapped task) for ``cfg.model`` on ``dataset``.

    With ``train`` the fused sparse optimizer is attached before sharding, as FBGEMM applies it
    inside the backward pass.
    """
    task = model_spec(cfg.model.name).build_task(cfg.model, cfg.model.section(), dataset)
    if train:
        attach_sparse_optimizer(task, cfg.optimizer)
    sharded = shard_model(task, cfg.sharding, ctx, batch_size=cfg.data.batch_size)  # logs where each table went
    return sharded, sharded.module


# --------------------------------------------------------------------------------------------
# binding a run to its dataset
# --------------------------------------------------------------------------------------------

# Manifest fields that do not change what the dataset is: where its source was read from, and
# which trec wrote it. Everything else (every file's SHA-256, split, seed, ID mapping, feature
# statistics) is identity.
_VOLATILE_MANIFEST_KEYS = ("source", "created_by", "created")


def dataset_fingerprint(dataset: PreparedDataset) -> str:
    """SHA-256 of the dataset's manifest without its volatile fields (hex, 64 characters).

    The manifest lists the SHA-256 of every file, so a dataset prepared again with another
    seed (another split) gets another fingerprint, while an identical re-prepare or a copy at
    another path keeps it.
    """
    identity = {key: value for key, value in dataset.manifest.items() if key not in _VOLATILE_MANIFEST_KEYS}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def short(fingerprint: object) -> str:
    """The first 12 hex digits, as messages quote a fingerprint (or a run ID)."""
    return str(fingerprint)[:12] if fingerprint else "none"


def read_run_record(run: RunDir) -> dict | None:
    """RUN/run.json ({run_id, created, dataset: {path, fingerprint}}), or None for a run made
    before trec recorded it."""
    if not run.record.is_file():
        return None
    record = read_json_object(run.record)
    dataset = record.get("dataset")
    if not isinstance(record.get("run_id"), str) or not isinstance(dataset, dict) \
            or not isinstance(dataset.get("fingerprint"), str):
        raise TrecError(f"{run.record}: expected run_id and dataset.fingerprint (strings); "
                        "the file is damaged (restore it, or train into a new --run-dir)")
    return record


def write_run_record(run: RunDir, dataset: PreparedDataset, previous: dict | None) -> dict:
    """Write RUN/run.json binding the run to ``dataset`` (atomically; the run ID of ``previous`` is kept)."""
    record = {
        "run_id": previous["run_id"] if previous else uuid.uuid4().hex,
        "created": previous.get("created") if previous else datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"path": str(dataset.path.resolve()), "fingerprint": dataset_fingerprint(dataset)},
    }
    atomic_write_json(run.record, record)
    return record


_legacy_warned: set[Path] = set()


def check_run_dataset(run: RunDir | Path, dataset: PreparedDataset) -> dict | None:
    """Refuse (one line naming both) a dataset other than the one the run (a RunDir or its path) trained on.

    Returns the run's record; None for a run made before run.json existed, which cannot be
    checked (warned once per process; training it again records the binding).
    """
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    record = read_run_record(run)
    if record is None:
        if run.root.resolve() not in _legacy_warned:
            _legacy_warned.add(run.root.resolve())
            logger.warning("%s: no %s (made before trec bound runs to datasets): cannot check that %s is the "
                           "dataset it was trained on", run.root, RUN_RECORD, dataset.path)
        return None
    bound, now = record["dataset"]["fingerprint"], dataset_fingerprint(dataset)
    if bound != now:
        raise TrecError(
            f"{run.root}: trained on dataset {record['dataset'].get('path')} (fingerprint {short(bound)}), but "
            f"{dataset.path} has fingerprint {short(now)} (prepared again, or another dataset): results would be "
            "wrong; use the dataset the run was trained on, or train a new run on this one"
        )
    return record


# --------------------------------------------------------------------------------------------
# resuming safely
# --------------------------------------------------------------------------------------------

# Config keys (dotted prefixes) a resumed run may change: where to find the data (its
# fingerprint is checked instead), how far to train, how often to validate, log and save, how to
# shard (DCP re-shards on load) and how to evaluate or export. Every other key changes the
# model's shapes or what training means (model.*, optimizer.*, data.batch_size and the reader's
# order, training.seed, the early-stopping metric, new keys by default) and is refused; so are
# evaluation.gain and evaluation.exclude_train, which change the value of the validation metric
# that best/ and early stopping compare with the best_metric the checkpoint saved.
RESUMABLE_KEYS = (
    "data.path", "data.eval_batch_size", "data.prefetch_batches", "data.prepare.",
    "training.epochs", "training.max_steps", "training.eval_every_steps", "training.early_stopping_patience",
    "training.pipeline", "training.device",
    "sharding.", "evaluation.ks", "evaluation.max_users", "evaluation.popularity_baseline",
    "checkpoint.", "logging.", "export.",
)


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        flat: dict[str, object] = {}
        for key, value in node.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix[:-1]: node}


def changed_keys(old: TrecConfig, new: TrecConfig) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs, in key order."""
    before, after = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    return [(key, before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)]


def check_resumable_config(cfg: TrecConfig, run: RunDir) -> None:
    """Refuse (one line naming the keys) a start that would resume ``run`` with a config that
    changes shapes or semantics (see :data:`RESUMABLE_KEYS`). Reads only; call it before writing."""
    if not run.config.is_file():
        return
    saved = load_config(run.config)
    refused = [(key, old, new) for key, old, new in changed_keys(saved, cfg)
               if not any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUMABLE_KEYS)]
    if refused:
        listed = ", ".join(f"{key} {_brief(old)} -> {_brief(new)}" for key, old, new in refused)
        raise TrecError(
            f"{run.config}: the run has checkpoints and this start changes {listed}; resuming with "
            "them would damage the run (shapes or meaning differ): train into a new --run-dir, or keep the "
            "run's values (run `trec train --run-dir DIR` without --config to resume it as it is)"
        )


def _brief(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finished_reason(state: TrainerState, total_steps: int) -> str | None:
    """Why a run whose newest checkpoint has ``state`` has nothing left to train, or None."""
    if state.early_stopped:
        return f"early-stopped at step {state.step}"
    if state.step >= total_steps:
        return f"final step {total_steps} reached"
    return None


def resumable_state(state: TrainerState, checkpoint: Path, dataset: PreparedDataset, world_size: int) -> TrainerState:
    """``state`` (of ``checkpoint``) ready to resume on ``dataset`` with ``world_size`` ranks; refuses
    (one line) a checkpoint trained on another dataset."""
    ours = dataset_fingerprint(dataset)
    if state.dataset_fingerprint and state.dataset_fingerprint != ours:
        raise TrecError(f"{checkpoint}: trained on a dataset with fingerprint {short(state.dataset_fingerprint)}, "
                        f"but {dataset.path} has fingerprint {short(ours)}; resume on the dataset it was trained on, "
                        "or train a new --run-dir")
    state.dataset_fingerprint = ours  # a checkpoint from before fingerprints were recorded
    if state.world_size != world_size:
        # The split is re-partitioned across a different number of ranks: keep the epoch and
        # the share of it already trained; the exact batch order cannot carry over.
        state.batch_in_epoch = state.batch_in_epoch * state.world_size // world_size
        logger.warning("resuming a %d-rank checkpoint on %d ranks: data order within the epoch changes",
                       state.world_size, world_size)
        state.world_size = world_size
    return state


def record_run(run: RunDir, cfg: TrecConfig, dataset: PreparedDataset, record: dict | None, step: int) -> dict:
    """Write config.yaml, and run.json unless ``record`` (the run's) already binds ``dataset``; returns
    the record. Rank 0 only, atomically, once the model is built and any checkpoint (at ``step``)
    loaded: a start that fails before leaves the run's record as it was."""
    save_config(cfg, run.config)
    if record is None or record["dataset"]["fingerprint"] != dataset_fingerprint(dataset):
        if record is None and step:
            logger.warning("%s: binding this run (trained before run.json existed) to %s (fingerprint %s)",
                           run.root, dataset.path, short(dataset_fingerprint(dataset)))
        record = write_run_record(run, dataset, record)
    return record


def final_metrics(run: RunDir) -> dict | None:
    """RUN/metrics.json if it holds the final evaluation of the run's newest checkpoint, else None."""
    latest = latest_checkpoint(run.checkpoints)
    if latest is None or not run.metrics.is_file():
        return None
    metrics = read_json_object(run.metrics)
    return metrics if metrics.get("step") == read_trainer_state(latest).step else None


@dataclass
class TrainedRun:
    run: RunDir
    cfg: TrecConfig
    dataset: PreparedDataset
    model: nn.Module
    """The DMP-wrapped task (in eval mode)."""
    task: nn.Module
    """The unwrapped task (its sharded submodules can be called directly)."""
    checkpoint: Path
    record: dict | None = None
    """RUN/run.json (run ID, dataset binding); None for a run made before it existed."""

    @property
    def run_id(self) -> str | None:
        return self.record["run_id"] if self.record else None

    @property
    def dataset_fingerprint(self) -> str:
        return dataset_fingerprint(self.dataset)

    def binding(self) -> dict[str, object]:
        """What an export of this run records about where its vectors came from."""
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run.root.resolve()),
            "checkpoint_name": self.checkpoint.name,
            "step": read_trainer_state(self.checkpoint).step,
            "dataset_fingerprint": self.dataset_fingerprint,
        }


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> TrecConfig:
    run = RunDir(Path(run_dir))
    if not run.config.is_file():
        raise TrecError(f"{run.config}: not found (is {run.root} a trec run directory?)")
    return load_config(run.config, overrides)


def load_trained_run(run_dir: Path, ctx: DistContext, overrides: Sequence[str] = (),
                     dataset: PreparedDataset | None = None) -> TrainedRun:
    """Rebuild the run's model on this world size and load its best (or newest) checkpoint (collective).

    ``dataset``: the dataset to use, already open (default: the run's ``data.path``); either way
    it must be the dataset the run was trained on (:func:`check_run_dataset`).
    """
    run = RunDir(Path(run_dir))
    cfg = run_config(run.root, overrides)
    checkpoint = checkpoint_for_inference(run.root)
    dataset = dataset or PreparedDataset.open(cfg.data.path, positive_threshold=cfg.data.positive_threshold)
    record = check_run_dataset(run, dataset)
    model, task = build_sharded_task(cfg, dataset, ctx, train=False)
    load_model_weights(checkpoint, model)
    model.eval()
    return TrainedRun(run, cfg, dataset, model, task, checkpoint, record)


def check_index_binding(index, loaded: TrainedRun) -> None:
    """Refuse (one line) an export (a :class:`trec.export.ShardedIndex`) that was not made from
    ``loaded``'s run, its current inference checkpoint and its dataset, or that holds an item index
    outside the dataset's catalog: its item vectors would not match the run's user tower."""
    manifest, where = index.manifest, index.root
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    redo = f"export the run again (trec export --run-dir {loaded.run.root} --out {where} --overwrite)"
    if not isinstance(source.get("dataset_fingerprint"), str):
        raise TrecError(f"{where}: the export does not record the run and dataset it came from (made by an "
                        f"older trec); {redo}")
    ours = loaded.binding()
    if source["dataset_fingerprint"] != ours["dataset_fingerprint"]:
        raise TrecError(f"{where}: exported from dataset fingerprint {short(source['dataset_fingerprint'])}, but "
                        f"run {loaded.run.root} uses {loaded.dataset.path} (fingerprint "
                        f"{short(ours['dataset_fingerprint'])}); {redo}")
    # A run made before run.json has no ID (None == None): its directory tells it apart instead.
    legacy_other = ours["run_id"] is None and source.get("run_dir") != ours["run_dir"]
    if source.get("run_id") != ours["run_id"] or legacy_other:
        raise TrecError(f"{where}: exported from run {source.get('run_dir')} (ID {short(source.get('run_id'))}), "
                        f"not from {loaded.run.root} (ID {short(ours['run_id'])}); pass the run it came from, or {redo}")
    if (source.get("checkpoint_name"), source.get("step")) != (ours["checkpoint_name"], ours["step"]):
        raise TrecError(f"{where}: holds the vectors of checkpoint {source.get('checkpoint_name')} at step "
                        f"{source.get('step')}, but {loaded.run.root} now loads {ours['checkpoint_name']} at step "
                        f"{ours['step']} (trained further?); {redo}")
    index.check_catalog(loaded.dataset.num_items, str(loaded.dataset.path))


def retriever_of_run(loaded: TrainedRun) -> Retriever:
    """The :class:`~trec.models.Retriever` of a retrieval run, or one line for another kind of run."""
    retriever = retriever_of(loaded.task)
    if retriever is None:
        raise TrecError(f"{loaded.run.root}: a retrieval run is needed (a model with a retriever: users and items "
                        f"in one space); model.name is '{loaded.cfg.model.name}'")
    return retriever


def retriever_run(run_dir: Path, dataset: PreparedDataset, ctx: DistContext) -> RetrieverRun:
    """Another trained retrieval run, checked to be trained on ``dataset``: what a model's setup hook
    receives through :class:`~trec.models.SetupContext` (e.g. to mine hard negatives). Reads only
    the run's config, run.json and checkpoint state; ``load()`` builds and loads the model (collective)."""
    run = RunDir(Path(run_dir))
    cfg = run_config(run.root)
    checkpoint = checkpoint_for_inference(run.root)
    check_run_dataset(run, dataset)
    source = {"retrieval_run": str(run.root.resolve()),
              "retrieval_checkpoint": f"{checkpoint.name}@{read_trainer_state(checkpoint).step}",
              "dataset_fingerprint": dataset_fingerprint(dataset)}
    return RetrieverRun(source, cfg.data, lambda: retriever_of_run(load_trained_run(run.root, ctx, dataset=dataset)))
