"""The servable bundle: what `trec serve` loads, written by `trec export` into ``EXPORT/bundle/``.

::

    bundle/manifest.json            format_version, created, version, retriever and ranker bindings,
                                    files: {relative path: {bytes, sha256}} of every file below
    bundle/retriever/config.yaml    the retrieval run's resolved config (safe YAML)
    bundle/retriever/weights.pt     unsharded tensors of the run's task (name → tensor; torch.load(weights_only=True))
    bundle/ranker/...               the same for ``--ranker-run-dir`` (a dcn run on the same dataset), if given
    bundle/tables/                  request-time tables (:mod:`trec.data.tables`): no splits

Weights are unsharded by loading the DCP checkpoint into a task built without DMP, whose
tables are materialised on the CPU (DCP reshards to full tensors); ``weights.pt`` holds its
state dict plus its non-persistent buffers (values derived from the training data, such as the
ranker's rating centre, that the request-time tables cannot derive again). This module's
constants and :func:`unsharded_task` are what serving reads a bundle with; writing imports
trec.checkpoint only when called, so serving never does.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from trec.config import TrecConfig, save_config
from trec.errors import TrecError
from trec.io import atomic_write_json, sha256_file

BUNDLE_DIR = "bundle"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
RETRIEVER = "retriever"
RANKER = "ranker"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.pt"
TABLES_DIR = "tables"


def unsharded_task(cfg: TrecConfig, dataset) -> nn.Module:
    """``cfg``'s task on ``dataset``, single-process: its meta-device tables materialised (uninitialised)
    on the CPU, every other parameter as built. Load weights into it before use."""
    from trec.models import model_spec

    task = model_spec(cfg.model.name).build_task(cfg.model, cfg.model.section(), dataset)
    for module in task.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(tensor.is_meta for tensor in own):
            module.to_empty(device="cpu", recurse=False)
    return task


def task_tensors(task: nn.Module) -> dict[str, torch.Tensor]:
    """What ``weights.pt`` holds: the state dict plus the non-persistent buffers, contiguous CPU tensors."""
    tensors = dict(task.state_dict())
    tensors |= {name: buffer for name, buffer in task.named_buffers() if name not in tensors}
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def load_task_tensors(task: nn.Module, path: Path) -> None:
    """Load ``weights.pt`` into ``task`` (strict: every state-dict key, nothing unknown); no pickle runs."""
    try:
        tensors = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # truncated, or not a tensors-only file (weights_only refuses code)
        raise TrecError(f"{path}: not a readable weights file ({type(error).__name__}); export again") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise TrecError(f"{path}: not a dict of tensors")
    keys = set(task.state_dict())
    buffers = dict(task.named_buffers())
    unknown = sorted(set(tensors) - keys - set(buffers))
    missing = sorted(keys - set(tensors))
    if unknown or missing:
        raise TrecError(f"{path}: does not match the model of its config.yaml "
                        f"({'missing ' + missing[0] if missing else 'unknown ' + unknown[0]})")
    try:
        task.load_state_dict({name: tensors[name] for name in keys}, strict=True)
    except RuntimeError as error:  # a shape differs
        raise TrecError(f"{path}: does not match the model of its config.yaml "
                        f"({str(error).strip().splitlines()[-1].strip()})") from None
    with torch.no_grad():
        for name in set(tensors) - keys:
            buffers[name].copy_(tensors[name])


def binding_of(run_dir: Path, checkpoint: Path, model: str, fingerprint: str, run_id: str | None) -> dict:
    """What the bundle records about a run it holds (as an export's ``source`` does)."""
    from trec.checkpoint import read_trainer_state

    return {"run_id": run_id, "run_dir": str(Path(run_dir).resolve()), "checkpoint_name": checkpoint.name,
            "step": read_trainer_state(checkpoint).step, "dataset_fingerprint": fingerprint, "model": model}


def _write_model(directory: Path, cfg: TrecConfig, task: nn.Module) -> None:
    directory.mkdir(parents=True)
    save_config(cfg, directory / CONFIG_FILE)
    torch.save(task_tensors(task), directory / WEIGHTS_FILE)


def write_bundle(out: Path, dataset, retriever: tuple[TrecConfig, Path, dict],
                 ranker: tuple[TrecConfig, Path, dict] | None, is_main: bool) -> dict | None:
    """Write ``out/bundle/`` (collective: every export rank calls it; rank 0 writes). Returns its manifest on
    rank 0, None elsewhere.

    ``retriever`` and ``ranker``: (the run's config, its inference checkpoint, its binding from
    :func:`binding_of`). Every rank loads the checkpoint into an unsharded task (DCP's load is a
    collective when a process group exists); ``out`` is the export's temporary directory, so a
    failed export leaves no bundle behind.
    """
    from trec.checkpoint import load_model_weights

    root = Path(out) / BUNDLE_DIR
    models = {}
    for name, run in ((RETRIEVER, retriever), (RANKER, ranker)):
        if run is not None:
            cfg, checkpoint, _ = run
            task = unsharded_task(cfg, dataset)
            load_model_weights(checkpoint, task)
            models[name] = (cfg, task)
    if not is_main:
        return None
    from trec.data.tables import write_request_tables

    root.mkdir()
    for name, (cfg, task) in models.items():
        _write_model(root / name, cfg, task)
    write_request_tables(dataset, root / TABLES_DIR)
    binding = retriever[2]
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": f"{str(binding['run_id'] or 'norunid')[:12]}@{binding['checkpoint_name']}-{binding['step']}",
        RETRIEVER: binding,
        RANKER: ranker[2] if ranker is not None else None,
        "files": {path.relative_to(root).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                  for path in sorted(root.rglob("*")) if path.is_file()},
    }
    atomic_write_json(root / MANIFEST, manifest)
    return manifest
