"""What one server process serves: the loaded versions, who gets which, and swapping them live.

    options = ServeOptions(model_root="models", store="redis://127.0.0.1:6379/0", events="events/")
    deployment = Deployment(options, metrics)
    await deployment.load()                  # the CURRENT version (+ the experiment's arms), warmed up
    lane, arm = deployment.route("196")      # the user's version (an arm's, or the current one)
    await deployment.reload()                # CURRENT moved: load the new version, then swap

A :class:`Lane` is one loaded version with its micro-batcher. :meth:`Deployment.reload` loads and
warms what is new in the background while the old lanes keep answering, swaps the lane set in one
assignment (asyncio runs one handler step at a time, so a request sees the old set or the new one,
never a mix), then stops each retired lane once the requests that entered it have their answers:
a request in flight finishes on the version it started on. With a model root (``trec publish``),
``watch_s`` polls the CURRENT pointer, which is how every ``--workers`` process follows a publish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from trec.errors import TrecError
from trec.serving.batcher import MicroBatcher
from trec.serving.events import DEFAULT_EVENT_LABELS, EventLog
from trec.serving.experiments import Arm, Experiment, ExperimentLog, assign, load_experiments
from trec.serving.metrics import ServingMetrics, TimedIndex
from trec.serving.online import Online
from trec.serving.recommender import Recommender, Settings
from trec.serving.store import MEMORY, GuardedStore, open_store
from trec.serving.versions import current_name, pointer_stamp, version_path

log = logging.getLogger("trec.serving")


@dataclass(frozen=True)
class ServeOptions:
    """Everything a serving process is started with (JSON in ``TREC_SERVE_OPTIONS`` for --workers)."""

    bundle: str | None = None
    """An export directory to serve (or its bundle/); or ``model_root``."""
    model_root: str | None = None
    """A `trec publish` model root: its CURRENT version is served."""
    max_batch: int = 64
    """Most /recommend requests in one recommend_many call (1: one at a time)."""
    max_wait_ms: float = 2.0
    """How long the first request of a batch waits for others."""
    threads: int | None = None
    """torch threads of each worker thread (None: torch's default)."""
    settings: Settings = field(default_factory=Settings)
    """The recommender's limits, cold-start thresholds and stages."""
    store: str = MEMORY
    """``memory`` or ``redis://HOST:PORT/DB``: online histories and experiment counters."""
    store_timeout_ms: float = 50.0
    events: str | None = None
    """Directory of the feedback event log (Parquet); None: feedback is not logged."""
    event_labels: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_LABELS))
    history_len: int | None = None
    """Online history kept per user (None: the retriever's data.history_max_len)."""
    experiments: str | None = None
    """A YAML file of one experiment whose arms are versions of ``model_root``."""
    watch_s: float = 0.0
    """Poll the model root's CURRENT pointer every this many seconds (0: only POST /admin/reload)."""
    verified: str | None = None
    """The version path whose checksums `trec serve` verified before binding its port (loaded without
    re-hashing); every other version, and every reload, is verified when loaded."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeOptions":
        values = json.loads(text)
        return cls(**{**values, "settings": Settings(**values["settings"])})


@dataclass
class Lane:
    """One loaded version and its micro-batcher; ``active`` counts the requests inside it."""

    name: str
    recommender: Recommender
    batcher: MicroBatcher
    published: bool
    """A version of a model root (its name is then answered as ``version``), not a bundle path."""
    active: int = 0


@dataclass(frozen=True)
class LaneSet:
    """The lanes served at one moment: the default (CURRENT or the bundle) and the experiment's arms."""

    current: str
    lanes: dict[str, Lane]
    experiment: Experiment | None

    @property
    def default(self) -> Lane:
        return self.lanes[self.current]


class Deployment:
    """The loaded versions of one process, their routing and their reload (see the module docstring)."""

    def __init__(self, options: ServeOptions, metrics: ServingMetrics) -> None:
        if (options.bundle is None) == (options.model_root is None):
            raise TrecError("serve a bundle (EXPORT) or a --model-root, not both")
        if options.experiments and options.model_root is None:
            raise TrecError("--experiments needs --model-root (its arms are published versions)")
        self.options = options
        self.metrics = metrics
        self.lane_set: LaneSet | None = None
        self.store: GuardedStore = open_store(options.store, options.store_timeout_ms / 1000,
                                              on_health=metrics.set_store_up)
        metrics.set_store_up(self.store.healthy)
        self.online: Online | None = None
        self.events: EventLog | None = None
        self._reloading = asyncio.Lock()
        self._stamp = None

    # ------------------------------------------------------------------------------- loading

    def _names(self) -> tuple[str, Experiment | None]:
        """(the version to serve by default, the experiment or None), read from disk now."""
        if self.options.model_root is None:
            return self.options.bundle, None
        root = Path(self.options.model_root)
        self._stamp = pointer_stamp(root)
        experiment = None
        if self.options.experiments:
            experiments = load_experiments(self.options.experiments)
            if len(experiments) != 1:
                raise TrecError(f"{self.options.experiments}: one experiment at a time is served, "
                                f"found {len(experiments)}")
            experiment = experiments[0]
            for arm in experiment.arms:
                version_path(root, arm.version)  # a missing version is one line here, before any load
        return current_name(root), experiment

    def _path(self, name: str) -> Path:
        if self.options.model_root is None:
            return Path(name)
        return version_path(Path(self.options.model_root), name)

    async def _lane(self, name: str, reuse: dict[str, Lane]) -> Lane:
        if name in reuse:
            return reuse[name]
        options, path = self.options, self._path(name)
        verify = self.lane_set is not None or str(path) != options.verified
        recommender = await asyncio.to_thread(Recommender.load, path, options.settings, verify=verify)
        recommender.bundle.index = TimedIndex(recommender.bundle.index, self.metrics)
        lane_online = self._online(recommender)
        batcher = MicroBatcher(lambda requests: lane_online.recommend_many(recommender, requests), options.max_batch,
                               options.max_wait_ms, options.threads, on_batch=self.metrics.observe_batch)
        await batcher.start()
        return Lane(name, recommender, batcher, options.model_root is not None)

    def _online(self, recommender: Recommender) -> Online:
        """The process's one Online, built with the first loaded version's tables (context names,
        positive threshold, history length)."""
        if self.online is None:
            options, tables = self.options, recommender.tables
            if options.events:  # one directory per host: replicas never share a write-ahead file or a name
                self.events = EventLog(Path(options.events) / socket.gethostname(), tables.context_names)
            history_len = options.history_len or recommender.bundle.retriever_config.data.history_max_len or 200
            self.online = Online(self.store, options.event_labels, tables.positive_threshold, history_len,
                                 tuple(tables.context_names), self.events, None, ExperimentLog(self.store),
                                 self.metrics.observe_feedback)
        return self.online

    async def load(self) -> LaneSet:
        """Load what should be served now and swap it in (the first load, or a reload)."""
        async with self._reloading:
            current, experiment = await asyncio.to_thread(self._names)
            old = self.lane_set
            reuse = dict(old.lanes) if old is not None else {}
            names = [current] + ([arm.version for arm in experiment.arms] if experiment else [])
            lanes = {}
            for name in dict.fromkeys(names):
                lanes[name] = await self._lane(name, reuse)
            self.online.experiment = experiment
            self.lane_set = LaneSet(current, lanes, experiment)
            self._publish_metrics()
            if old is not None:
                retired = [lane for name, lane in old.lanes.items() if name not in lanes]
                await asyncio.gather(*(self._retire(lane) for lane in retired))
                if retired:
                    gc.unfreeze()  # the retired versions' objects may be freed now
            # Loaded versions are permanent until a reload: keep them out of the collector's full passes,
            # which otherwise stall every in-flight answer at once (p99 ~250 ms at 32 clients).
            gc.collect()
            gc.freeze()
            return self.lane_set

    async def reload(self) -> tuple[str | None, str]:
        """(the default version before, after) once the newly wanted versions serve."""
        before = self.lane_set.current if self.lane_set is not None else None
        self.metrics.observe_reload("started")
        try:
            after = (await self.load()).current
        except Exception:
            self.metrics.observe_reload("failed")
            raise
        self.metrics.observe_reload("done")
        return before, after

    async def _retire(self, lane: Lane) -> None:
        while lane.active:  # requests that entered the old lane finish there
            await asyncio.sleep(0.005)
        await lane.batcher.stop()
        log.info("retired version %s", lane.name)

    async def watch(self) -> None:
        """Reload whenever the model root's CURRENT pointer changes (every ``watch_s`` seconds)."""
        root = Path(self.options.model_root)
        while True:
            await asyncio.sleep(self.options.watch_s)
            try:
                if pointer_stamp(root) != self._stamp:
                    before, after = await self.reload()
                    log.info("CURRENT changed: %s -> %s", before, after)
            except Exception:  # noqa: BLE001 - a bad publish must not stop the watcher or the server
                log.exception("reload after a CURRENT change failed; still serving %s", self.lane_set.current)

    # ------------------------------------------------------------------------------- routing

    def route(self, user_id: object) -> tuple[Lane, Arm | None]:
        """The lane that answers ``user_id`` (its experiment arm's version, or the default) and the arm."""
        lane_set = self.lane_set
        if lane_set.experiment is None:
            return lane_set.default, None
        arm = assign(lane_set.experiment, str(user_id))
        return lane_set.lanes[arm.version], arm

    def _publish_metrics(self) -> None:
        lanes = self.lane_set.lanes.values()
        self.metrics.set_models([(lane.name, lane.recommender) for lane in lanes], self.lane_set.current)

    async def close(self) -> None:
        if self.lane_set is not None:
            await asyncio.gather(*(lane.batcher.stop() for lane in self.lane_set.lanes.values()))
        if self.events is not None:
            self.events.close()
        self.store.close()
