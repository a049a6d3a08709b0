"""The prediction log: every answer of `serve` and `web`, written off the request path.

`PredictionLog.record` only puts the answer on a bounded queue (it never blocks and never raises); a
background thread computes the input features, and writes batches with SQLAlchemy's parameterized
inserts. When the store is slow or down, the queue fills or a batch fails: those rows are dropped
and counted (`stats()`, one log line a minute at most), and the writer reconnects when the store
comes back. The store is SQLite in the project by default (`monitor.storage`); a PostgreSQL URL
lets many servers share one log.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError, first_line, redact
from pipeline.core.paths import sqlite_file
from pipeline.monitoring.drift import NOT_A_DIGIT, Sample
from pipeline.monitoring.features import FEATURES, as_pixels, input_features

log = logging.getLogger("pipeline.monitoring.log")

FEEDBACK_LABELS = {**{str(digit): digit for digit in range(10)}, "not-digit": NOT_A_DIGIT}
DROP_REPORT_S = 60.0  # at most one log line this often about dropped rows
RECONNECT_S = 2.0  # a writer whose store failed tries again after this long
CONNECT_TIMEOUT_S = 3


def new_request_id() -> str:
    return uuid.uuid4().hex


def prediction_ids(request_id: str, count: int) -> list[str]:
    """One id per picture of a request: the request's id and the picture's index."""
    return [f"{request_id}-{index}" for index in range(count)]


@dataclass(frozen=True)
class Entry:
    """One request's answers, as the server hands them over (the writer derives the rest)."""

    time: float  # unix seconds
    request_id: str
    interface: str  # serve | web
    model: str
    version: str | None
    pixels: np.ndarray  # (n, 28, 28) 0-255
    probabilities: np.ndarray  # (n, 10)
    is_digit: np.ndarray | None  # (n,) bool; None without a verdict
    digit_scores: np.ndarray | None
    latency_ms: float


def tables(metadata=None):
    """The log's two tables: one row per answered picture, and the last feedback per prediction."""
    from sqlalchemy import Boolean, Column, Float, Index, LargeBinary, MetaData, SmallInteger, String, Table

    metadata = metadata or MetaData()
    predictions = Table(
        "predictions", metadata,
        Column("id", String(48), primary_key=True),
        Column("time", Float, nullable=False),
        Column("request_id", String(32), nullable=False),
        Column("interface", String(8), nullable=False),
        Column("model", String(256), nullable=False),
        Column("version", String(32)),
        Column("label", SmallInteger, nullable=False),
        Column("confidence", Float, nullable=False),
        Column("is_digit", Boolean),
        Column("digit_score", Float),
        Column("latency_ms", Float, nullable=False),
        *(Column(name, Float, nullable=False) for name in FEATURES),
        Column("pixels", LargeBinary),  # 784 bytes, row-major uint8; None when monitor.store_pixels is off
        Index("ix_predictions_time", "time"),
    )
    feedback = Table(
        "feedback", metadata,
        Column("prediction_id", String(48), primary_key=True),
        Column("label", SmallInteger, nullable=False),  # 0-9 or NOT_A_DIGIT
        Column("time", Float, nullable=False),
    )
    return metadata, predictions, feedback


def rows_of(batch: Sequence[Entry], store_pixels: bool) -> list[dict[str, Any]]:
    """The table rows of a batch of requests' answers (features computed here, in the writer, at once)."""
    pixels = as_pixels(np.concatenate([entry.pixels.reshape(-1, 28, 28) for entry in batch]))
    features = input_features(pixels).tolist()
    rows, start = [], 0
    for entry in batch:
        labels = entry.probabilities.argmax(axis=1).tolist()
        confidence = entry.probabilities.max(axis=1).tolist()
        for index, picture_id in enumerate(prediction_ids(entry.request_id, len(labels))):
            score = None if entry.digit_scores is None else float(entry.digit_scores[index])
            rows.append({
                "id": picture_id, "time": entry.time, "request_id": entry.request_id, "interface": entry.interface,
                "model": entry.model, "version": entry.version, "label": labels[index],
                "confidence": confidence[index],
                "is_digit": None if entry.is_digit is None else bool(entry.is_digit[index]),
                "digit_score": score if score is None or np.isfinite(score) else None,
                "latency_ms": float(entry.latency_ms),
                **dict(zip(FEATURES, features[start + index])),
                "pixels": pixels[start + index].tobytes() if store_pixels else None,
            })
        start += len(labels)
    return rows


def make_engine(url: str):
    """An engine for the log's store; a relative SQLite path lives in the project (folder created)."""
    from sqlalchemy import create_engine, event

    database = sqlite_file(url)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(f"sqlite:///{database}", connect_args={"timeout": 5})

        @event.listens_for(engine, "connect")
        def _wal(connection, _):  # readers (monitor) never block the writer, and several servers can share it
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")

        return engine
    return create_engine(sqlalchemy_url(url), pool_pre_ping=True, pool_size=2,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def sqlalchemy_url(url: str) -> str:
    """A PostgreSQL URL with the driver this project installs (psycopg 3); SQLAlchemy's default is psycopg2."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url.removeprefix(bare)
    return url


class StoreUnavailable(PipelineError):
    """The log's store cannot be reached or written."""


def store_problem(url: str, error: BaseException) -> str:
    return (f"the prediction log's store {redact(url)} is unreachable ({type(error).__name__}: "
            f"{redact(first_line(error))}); start it, or set monitor.storage to sqlite:///monitoring/predictions.db")


class PredictionLog:
    """A bounded queue in front of a background writer. `record` is the only call on the request path."""

    def __init__(self, url: str, store_pixels: bool, max_rows: int, queue_rows: int, batch_rows: int = 1000,
                 flush_s: float = 0.5) -> None:
        self.url = url
        self.store_pixels = store_pixels
        self.max_rows = max_rows
        self.batch_rows = batch_rows
        self.flush_s = flush_s
        self.queue_rows = queue_rows  # the bound: pictures waiting, over all queued requests
        self.queue: queue.SimpleQueue[Entry] = queue.SimpleQueue()
        self._queued_rows = 0
        self.written = 0  # rows
        self.dropped = 0  # rows, since start
        self.store_up: bool | None = None  # None until the first write
        self._dropped_reported = 0
        self._last_report = time.monotonic()
        self._enqueued = 0  # entries
        self._handled = 0  # entries written or dropped
        self._handled_changed = threading.Condition()
        self._count_lock = threading.Lock()  # record() runs on many threads (web) or beside the writer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine = None
        self._engine_lock = threading.Lock()
        self._tables = tables()
        self._since_trim = 0

    # -- the request path -------------------------------------------------------------------------
    def record(self, entry: Entry) -> None:
        """Hand one request's answers to the writer; when the queue is full they are dropped and counted."""
        rows = len(entry.pixels)
        with self._count_lock:
            if self._queued_rows + rows > self.queue_rows:
                self.dropped += rows
                return
            self._queued_rows += rows
            self._enqueued += 1
        self.queue.put_nowait(entry)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> PredictionLog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (within `timeout_s`), then stop the writer."""
        self.flush(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._engine is not None:
            self._engine.dispose()

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait until everything recorded so far is written or dropped; False on timeout."""
        target = self._enqueued
        with self._handled_changed:
            return self._handled_changed.wait_for(lambda: self._handled >= target, timeout_s)

    def save_feedback(self, prediction_id: str, label: int) -> None:
        """A user's label for one logged prediction (the last one given counts). UnknownPrediction when the
        log holds no such id (after writing what is queued, so an answer just given is found);
        StoreUnavailable when the store does not answer."""
        try:
            try:
                save_feedback(self._connect(), prediction_id, label)
            except UnknownPrediction:
                self.flush()
                save_feedback(self._connect(), prediction_id, label)
        except (UnknownPrediction, PipelineError):
            raise
        except Exception as error:
            raise StoreUnavailable(store_problem(self.url, error)) from None

    def stats(self) -> dict[str, Any]:
        """For /health: rows written and dropped since start, and whether the store answers."""
        return {"enabled": True, "written": self.written, "dropped": self.dropped, "queued": self._queued_rows,
                "store": {None: "unknown", True: "up", False: "down"}[self.store_up]}

    # -- the writer -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch:
                self._write(batch)
            self._report_drops()

    def _take(self) -> list[Entry]:
        """The next batch: what arrives within `flush_s` of its first entry, up to `batch_rows` rows. The
        writer sleeps through that time rather than waking for each entry, so it takes the GIL from the
        serving threads a few times a second, not once per request."""
        try:
            batch = [self.queue.get(timeout=self.flush_s)]
        except queue.Empty:
            return []
        rows = len(batch[0].pixels)
        self._stop.wait(self.flush_s)
        while rows < self.batch_rows:
            try:
                entry = self.queue.get_nowait()
            except queue.Empty:
                break
            batch.append(entry)
            rows += len(entry.pixels)
        with self._count_lock:
            self._queued_rows -= rows
        return batch

    def _write(self, batch: Sequence[Entry]) -> None:
        rows = rows_of(batch, self.store_pixels)
        try:
            with self._connect().begin() as connection:
                connection.execute(self._tables[1].insert(), rows)
            self.written += len(rows)
            self._store_answered(True)
            self._since_trim += len(rows)
            if self._since_trim >= max(self.max_rows // 100, self.batch_rows):
                self._since_trim = 0
                self._trim()
        except Exception as error:  # any store failure: drop, count, reconnect on the next batch
            with self._count_lock:
                self.dropped += len(rows)
            self._store_answered(False, error)
            self._reset_engine()
            self._stop.wait(RECONNECT_S)
        finally:
            with self._handled_changed:
                self._handled += len(batch)
                self._handled_changed.notify_all()

    def _connect(self):
        """The store's engine, its tables created on first use (the writer and feedback share it)."""
        with self._engine_lock:
            if self._engine is None:
                engine = make_engine(self.url)
                try:
                    self._tables[0].create_all(engine)
                except Exception:  # another server created them at the same moment: look again
                    self._tables[0].create_all(engine)
                self._engine = engine
            return self._engine

    def _reset_engine(self) -> None:
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            try:
                engine.dispose()
            except Exception:
                pass

    def _store_answered(self, up: bool, error: BaseException | None = None) -> None:
        if up and self.store_up is False:
            log.warning("prediction log: the store %s answers again; writing resumed", redact(self.url))
        elif not up and self.store_up is not False:
            log.warning("prediction log: %s; rows are dropped and counted until it answers",
                        store_problem(self.url, error))
        self.store_up = up

    def _report_drops(self) -> None:
        now = time.monotonic()
        if self.dropped > self._dropped_reported and now - self._last_report >= DROP_REPORT_S:
            log.warning("prediction log: %d rows dropped in the last %.0f s (%d since start); serving is unaffected",
                        self.dropped - self._dropped_reported, now - self._last_report, self.dropped)
            self._dropped_reported, self._last_report = self.dropped, now

    def _trim(self) -> None:
        """Keep at most max_rows predictions: the oldest ones without feedback go first."""
        from sqlalchemy import delete, func, select

        _, predictions, feedback = self._tables
        with self._connect().begin() as connection:
            count = connection.execute(select(func.count()).select_from(predictions)).scalar_one()
            if count <= self.max_rows:
                return
            cutoff = connection.execute(select(predictions.c.time).order_by(predictions.c.time.desc())
                                        .offset(self.max_rows).limit(1)).scalar_one()
            connection.execute(delete(predictions).where(predictions.c.time <= cutoff)
                               .where(predictions.c.id.not_in(select(feedback.c.prediction_id))))


class LogOff:
    """Stands in for the log under --no-log (or without a project): records nothing."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def record(self, entry: Entry) -> None:
        pass

    def start(self) -> LogOff:
        return self

    def stop(self, timeout_s: float = 0.0) -> None:
        pass

    def flush(self, timeout_s: float = 0.0) -> bool:
        return True

    def save_feedback(self, prediction_id: str, label: int) -> None:
        raise StoreUnavailable(f"feedback needs the prediction log, which is off here ({self.reason})")

    def stats(self) -> dict[str, Any]:
        return {"enabled": False, "reason": self.reason}


def open_log(settings, enabled: bool = True) -> PredictionLog | LogOff:
    """The log `serve` and `web` write, started (`settings`: params.yaml's `monitor` section, None outside a
    project); or LogOff naming why there is none."""
    if not enabled:
        return LogOff("--no-log")
    if settings is None:
        return LogOff("no params.yaml here to name monitor.storage")
    return PredictionLog(settings.storage, settings.store_pixels, settings.max_rows,
                         settings.queue_rows).start()


def describe_log(prediction_log: PredictionLog | LogOff) -> str:
    """One line for a server's start-up log."""
    if isinstance(prediction_log, LogOff):
        return f"prediction log off ({prediction_log.reason}): answers carry no prediction ids, /feedback answers 503"
    pixels = "with" if prediction_log.store_pixels else "without"
    return (f"prediction log: every answer ({pixels} its pixels) goes to {redact(prediction_log.url)}; "
            "POST /feedback {\"id\", \"label\"} labels one")


def parse_feedback_label(value: Any) -> int:
    """0-9 (a number or its string) or "not-digit"; ValueError naming the choices otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
        return value
    if isinstance(value, str) and value.strip().lower() in FEEDBACK_LABELS:
        return FEEDBACK_LABELS[value.strip().lower()]
    raise ValueError('"label" must be a digit 0-9 or "not-digit"')


PREDICTION_ID = re.compile(r"^[0-9a-f]{32}-[0-9]{1,6}$")  # `prediction_ids`' form


class UnknownPrediction(LookupError):
    """No logged prediction has this id."""


def save_feedback(engine, prediction_id: str, label: int, now: float | None = None) -> None:
    """Store a user's label for one prediction; a second answer for the same id replaces the first.
    UnknownPrediction when the log holds no such prediction."""
    from sqlalchemy import select

    _, predictions, feedback = tables()
    row = {"prediction_id": prediction_id, "label": label, "time": time.time() if now is None else now}
    with engine.begin() as connection:
        if connection.execute(select(predictions.c.id).where(predictions.c.id == prediction_id)).first() is None:
            raise UnknownPrediction(prediction_id)
        upsert = _upsert(engine.dialect.name, feedback, row)
        connection.execute(upsert)


def _upsert(dialect: str, table, row: dict[str, Any]):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise PipelineError(f"monitor.storage: {dialect} is not supported; use SQLite or PostgreSQL")
    statement = insert(table).values(**row)
    return statement.on_conflict_do_update(index_elements=[table.c.prediction_id],
                                           set_={"label": row["label"], "time": row["time"]})


def read_rows(engine, since: float | None = None, last: int | None = None, version: str | None = None,
              columns: Iterable[str] | None = None, labelled_only: bool = False):
    """The logged predictions (newest `last`, or since a unix time; only those with feedback if
    `labelled_only`), each with its feedback label (-1: none), oldest first, as a pandas DataFrame."""
    import pandas as pd
    from sqlalchemy import inspect, select

    _, predictions, feedback = tables()
    chosen = [predictions.c[name] for name in columns] if columns else list(predictions.c)
    if not inspect(engine).has_table("predictions"):  # no server has written yet
        return pd.DataFrame({**{column.name: [] for column in chosen}, "feedback": []})
    query = (select(*chosen, feedback.c.label.label("feedback"))
             .select_from(predictions.join(feedback, feedback.c.prediction_id == predictions.c.id,
                                           isouter=not labelled_only)))
    if since is not None:
        query = query.where(predictions.c.time >= since)
    if version is not None:
        query = query.where(predictions.c.version == version)
    query = query.order_by(predictions.c.time.desc(), predictions.c.id.desc())
    if last is not None:
        query = query.limit(last)
    with engine.connect() as connection:
        frame = pd.read_sql(query, connection)
    frame["feedback"] = frame["feedback"].fillna(-1).astype(int)
    return frame.iloc[::-1].reset_index(drop=True)


def window_sample(rows) -> Sample:
    """Logged rows (`read_rows`) as the drift checks read them; `is_digit` None unless every row has one."""
    verdicts = rows["is_digit"]
    is_digit = None if len(rows) == 0 or verdicts.isna().any() else verdicts.astype(bool).to_numpy()
    return Sample(rows[list(FEATURES)].to_numpy(np.float64).reshape(-1, len(FEATURES)),
                  rows["label"].to_numpy(np.int64), rows["confidence"].to_numpy(np.float64), is_digit,
                  rows["feedback"].to_numpy(np.int64))
