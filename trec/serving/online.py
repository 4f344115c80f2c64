"""Serving's online side: feedback in, users' real-time histories out, experiment counts on the way.

    online = Online(store, event_labels, positive_threshold=0.5, history_len=200, events=EventLog(DIR),
                    experiment=experiment, experiment_log=ExperimentLog(store))
    event = online.event({"user_id": "196", "item_id": "242", "event": "click"})   # RequestError naming a field
    online.feedback_many([event, ...])        # one log write (fsync), one store call, one experiment call
    online.histories(["196", "7"])            # raw item IDs, oldest first; None while the store is down

An event's label comes from ``event_labels`` (purchase 1.0, like 0.9, click 0.5, view 0.4, dislike
0.0 by default); an event whose label reaches the bundle's ``positive_threshold`` is a positive, as
in training, and its item joins the user's online history (the newest ``history_len`` items, each
once). The event log (:mod:`trec.serving.events`) is the record of every event, positive or not,
known item or not: `trec data prepare parquet --label-col label` turns it into the next training
set. The store only serves the present; with it down, feedback is still logged and requests are
answered from the bundle's offline histories.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from trec.serving.events import EventLog, FeedbackEvent
from trec.serving.experiments import Experiment, ExperimentLog, assign
from trec.serving.recommender import Recommender
from trec.serving.requests import RecommendRequest, RecommendResponse, RequestError, check_mapping, check_raw_id
from trec.serving.store import GuardedStore, StoreUnavailable

log = logging.getLogger("trec.serving")

_MAX_CONTEXT = 32


@dataclass(frozen=True)
class FeedbackResult:
    """What POST /feedback answers for one event."""

    label: float
    positive: bool
    logged: bool
    """Durably in the event log (False: the server runs without --events)."""
    history_length: int | None
    """The user's online history after the event; None when not a positive or the store is down."""
    arm: str | None


class Online:
    """Feedback, online histories and experiment counts over one store (see the module docstring)."""

    def __init__(self, store: GuardedStore, event_labels: dict[str, float], positive_threshold: float,
                 history_len: int, context_names: tuple[str, ...] = (), events: EventLog | None = None,
                 experiment: Experiment | None = None, experiment_log: ExperimentLog | None = None,
                 on_feedback: Callable[[str, bool], None] | None = None) -> None:
        self.store = store
        self.event_labels = event_labels
        self.positive_threshold = positive_threshold
        self.history_len = history_len
        self.context_names = context_names
        self.events = events
        self.experiment = experiment
        self.experiment_log = experiment_log
        self.on_feedback = on_feedback
        """Called with (event name, positive) for each accepted event (the metrics counter)."""

    # ------------------------------------------------------------------------------- feedback

    def event(self, body: dict) -> FeedbackEvent:
        """A checked :class:`FeedbackEvent` of a POST /feedback body (RequestError naming the field)."""
        user, item = check_raw_id(body.get("user_id"), "user_id"), check_raw_id(body.get("item_id"), "item_id")
        name = body.get("event")
        if name not in self.event_labels:
            raise RequestError("event", f"unknown event {name!r} (events: {', '.join(self.event_labels)})"[:300])
        timestamp = body.get("timestamp")
        if timestamp is None:
            timestamp = int(time.time())
        elif isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp < 2**41:
            raise RequestError("timestamp", f"expected unix seconds (an integer >= 0), got {timestamp!r}"[:200])
        context = {}
        for key, value in check_mapping(body.get("context"), "context").items():
            if key not in self.context_names:
                raise RequestError(f"context.{key}", "not a context feature of the model (context: "
                                   f"{', '.join(self.context_names) or 'none'})")
            context[key] = check_raw_id(value, f"context.{key}")
        experiment, arm = self._arm(user)
        return FeedbackEvent(user, item, name, self.event_labels[name], timestamp, context, experiment, arm)

    def feedback_many(self, events: list[FeedbackEvent]) -> list[FeedbackResult]:
        """Log ``events`` (durable when this returns), extend the positives' histories, count clicks."""
        if self.events is not None:
            self.events.append(events)  # OSError (a full disk): nothing is acknowledged
        positives: dict[str, list[str]] = {}
        for event in events:
            if event.label >= self.positive_threshold:
                positives.setdefault(event.user_id, []).append(event.item_id)
        lengths: dict[str, int] = {}
        try:
            if positives:
                lengths = dict(zip(positives, self.store.append_histories(positives, self.history_len)))
            if self.experiment_log is not None and self.experiment is not None:
                self.experiment_log.record_feedback([(self.experiment, e.user_id, e.item_id, e.event)
                                                     for e in events if e.experiment is not None])
        except StoreUnavailable as error:
            log.warning("feedback not applied online: %s", error)
        results = []
        for event in events:
            positive = event.label >= self.positive_threshold
            if self.on_feedback is not None:
                self.on_feedback(event.event, positive)
            results.append(FeedbackResult(event.label, positive, self.events is not None,
                                          lengths.get(event.user_id) if positive else None, event.arm))
        return results

    # ------------------------------------------------------------------------------- requests

    def histories(self, users: list[str]) -> list[list[str]] | None:
        """Each user's online history (raw item IDs, oldest first); None while the store is down."""
        try:
            return self.store.histories(users)
        except StoreUnavailable:
            return None

    def recommend_many(self, recommender: Recommender, requests: list[RecommendRequest]) -> list[RecommendResponse]:
        """``recommender.recommend_many`` with each user's online history, then the experiment's impressions."""
        users = [str(request.user_id) for request in requests]
        responses = recommender.recommend_many(requests, self.histories(users))
        if self.experiment_log is not None and self.experiment is not None:
            rows = [(self.experiment, assign(self.experiment, user), user, [item.item_id for item in response.items])
                    for user, response in zip(users, responses)]
            try:
                self.experiment_log.record_impressions(rows)
            except StoreUnavailable as error:
                log.warning("impressions not counted: %s", error)
        return responses

    def _arm(self, user: str) -> tuple[str | None, str | None]:
        if self.experiment is None:
            return None, None
        return self.experiment.name, assign(self.experiment, user).name
