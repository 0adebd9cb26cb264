"""source -> admission -> describe -> sink -> ack.

The pipeline knows only the :mod:`worker.protocols` and the endpoint pool. Each job runs
in its own task; at most ``jobs_in_flight`` are admitted from the source, and at most
``models.limit`` of them are talking to the model. A job's record is written (group-committed) and then the
job is acked; that last step is shielded from cancellation, so a shutdown never leaves a
record written but unacked, or acked but unwritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio

from .endpoints import EndpointPool
from .errors import DrainRequested, ErrorType, JobError, RecordRejected, ServiceError, SinkFailed
from .images import ImagePolicy
from .jobs import Job, error_record, fallback_id, parse_job, result_record
from .limits import Limiter
from .logs import redact
from .model import ModelCall
from .protocols import Answer, Delivery, PipelineObserver, Record, Source
from .retry import Kind, RetryPolicy, RetryState, retry_call
from .reuse import Reuse, StoredAnswer, content_key, job_fingerprint
from .schemas import Schemas, repair_prompt
from .settings import DEFAULT_PROMPT, Tier
from .sinks.batch import BatchWriter
from .tracing import Tracing

__all__ = ["Pipeline", "RunStats"]

log = logging.getLogger("worker.pipeline")

# What a span costs with tracing off: entering and leaving this, once per step.
_NO_SPAN: AbstractContextManager[Any] = nullcontext()


def _delivery_fields(delivery: Delivery) -> dict[str, Any]:
    """Log fields that tie a job to its queue message, when it came from one."""
    info = delivery.source_info
    if not info:
        return {}
    fields: dict[str, Any] = {}
    if "message_id" in info:
        fields["message_id"] = info["message_id"]
    if info.get("delivery_attempt") is not None:
        fields["delivery_attempt"] = info["delivery_attempt"]
    return fields


@dataclass
class RunStats:
    received: int = 0
    ok: int = 0
    dead_lettered: int = 0
    #: The same, by the record's error.type.
    dead_lettered_by_type: dict[str, int] = field(default_factory=dict)
    nacked: int = 0
    skipped: int = 0
    failed: int = 0  # could be put nowhere (sink down, non-redeliverable source)
    retries: int = 0
    rate_limited: int = 0
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    #: What the answers cost at list price (None: no price for the model).
    cost_usd: float | None = None
    #: The run stopped because --budget-usd was spent.
    budget_exhausted: bool = False
    #: ... and its source was a queue: the worker handed its jobs back and idled until
    #: stopped (a SIGTERM), so there is nothing to rerun.
    idled_at_budget: bool = False

    @property
    def seconds(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started_at

    def summary(self) -> dict[str, Any]:
        done = self.ok + self.dead_lettered
        secs = self.seconds
        return {
            "event": "run_summary",
            "ok": self.ok,
            "dead_lettered": self.dead_lettered,
            "skipped": self.skipped,
            "nacked": self.nacked,
            "failed": self.failed,
            "seconds": round(secs, 3),
            "jobs_per_s": round(done / secs, 2) if secs > 0 else 0.0,
            "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 6),
            "budget_exhausted": self.budget_exhausted,
        }


@dataclass(slots=True)
class _Outcome:
    kind: Literal["ok", "dead", "retry", "skip", "drained"]
    record: Record | None = None


class Pipeline:
    """source -> admission -> describe -> sink -> ack, for one source.

    Owns admission (at most ``jobs_in_flight`` jobs taken from the source and not
    finished), the per-job retry loop and the order of the last steps: a job's record
    is durable in its sink before the job is acked, and that step is shielded from
    cancellation. It knows sources, sinks and the model only through their protocols,
    and it never lets one job's failure stop the run: every job ends acked (record
    written), nacked (handed back) or counted as failed (a local source, sink down).
    """

    def __init__(
        self,
        *,
        source: Source,
        results: BatchWriter,
        dead_letter: BatchWriter,
        models: EndpointPool,
        retry: RetryPolicy,
        images: ImagePolicy,
        jobs_in_flight: int,
        done_ids: set[str] | None = None,
        observer: PipelineObserver | None = None,
        max_jobs: int | None = None,
        default_tier: Tier = "standard",
        generation: Mapping[str, Any] | None = None,
        schemas: Schemas | None = None,
        reuse: Reuse | None = None,
        prompt: str = DEFAULT_PROMPT,
        tracing: Tracing | None = None,
    ) -> None:
        self.source = source
        self.results = results
        self.dead_letter = dead_letter
        self.models = models
        self.default_tier: Tier = default_tier
        #: The worker's generation settings (a job's own win), as sent in the body.
        self.generation: dict[str, Any] = dict(generation or {})
        self.schemas = schemas
        #: Answers and records shared through the result store; None: no store.
        self.reuse = reuse
        self.prompt = prompt
        #: OpenTelemetry spans per job when tracing is on (worker/tracing.py); else None.
        self.tracing = tracing
        self.retry = retry
        self.images = images
        self.admission = Limiter(jobs_in_flight)
        # Jobs whose record waits for a sink that batches (an object finalised when full
        # or old): they give their admission slot back while they wait (see _finish).
        pending = results.sink.max_pending_records
        if dead_letter is not results:
            pending += dead_letter.sink.max_pending_records
        self._handoff = Limiter(pending) if pending > 0 else None
        # Before the source's services start: a queue holds only what we can take.
        self._tell_capacity()
        self._max_jobs_in_flight = jobs_in_flight
        self._followed_limit = 0
        #: Stop reading after this many jobs (a load test on a subscription); None: never.
        self.max_jobs = max_jobs
        self.done_ids = done_ids or set()
        self.stats = RunStats()
        self._observer = observer
        self._stop_reading = anyio.CancelScope()
        # Jobs waiting for quota or a model slot: on drain they are handed back at once.
        self._draining = False
        #: True once ``budget_reached`` stopped the run.
        self.budget_exhausted = False
        self._waiting_for_slot: set[anyio.CancelScope] = set()
        # Jobs between a failed attempt and the next one (by their RetryState's id).
        self._backing_off: set[int] = set()
        self._jobs_scope: anyio.CancelScope | None = None

    # -- control -------------------------------------------------------------------

    def stop_reading(self) -> None:
        """Take no more jobs from the source; those admitted carry on."""
        self._stop_reading.cancel()

    def drain(self) -> None:
        """Shutdown: take no more jobs; jobs talking to the model carry on, and jobs still
        waiting for quota or a model slot are handed back at once: they could only start
        calls that the shutdown grace may cut short, spending quota for nothing."""
        self.stop_reading()
        self._draining = True
        self.models.close()
        for scope in self._waiting_for_slot:
            scope.cancel()

    def budget_reached(self) -> None:
        """The budget is spent: admit nothing more and hand back what has not been sent
        (it may run again when the budget allows); what is talking to the model finishes."""
        if self.budget_exhausted:
            return
        self.budget_exhausted = True
        log.warning(
            "budget_exhausted",
            extra={"in_flight": self.models.in_use, "waiting": self.models.waiting},
        )
        self.drain()

    def abandon_in_flight(self) -> None:
        """Cancel jobs still talking to the model; each is nacked (shielded)."""
        self._stop_reading.cancel()
        if self._jobs_scope is not None:
            self._jobs_scope.cancel()

    @property
    def in_flight(self) -> int:
        return self.admission.in_use

    def _follow_limit(self) -> None:
        """Under ``--concurrency auto`` admit jobs in proportion to the model limit in force.

        With a fixed ceiling of 2 x max_concurrency, a quota that settles the limit at 30
        would still hold 500 jobs: they age inside the worker, and a queue's messages stay
        leased here instead of going to replicas with room. Twice the limit (plus a little
        for jobs busy reading images or writing records) keeps every slot fed.
        """
        if not self.models.adaptive:
            return
        # Jobs sleeping in retry backoff hold an admission slot but cannot use a model
        # slot: counted here, they do not starve the limit of the work that shows it in
        # use. (Without it, 10% of 5xx answers on a flaky backend kept a third of the
        # slots idle, and an adaptive limit grows only while it is used.)
        target = 2 * self.models.limit + 8 + len(self._backing_off)
        if target == self._followed_limit:
            return
        self._followed_limit = target
        jobs = max(1, min(self._max_jobs_in_flight, target))
        self.admission.set_limit(jobs)
        self._tell_capacity()

    def _tell_capacity(self) -> None:
        """How many jobs the source should hold: those admitted, and those waiting for a
        batching sink to make their record durable."""
        pending = self._handoff.limit if self._handoff is not None else 0
        self.source.set_capacity(self.admission.limit + pending)

    # -- the run ---------------------------------------------------------------------

    async def run(self) -> RunStats:
        """Feed every job of the source through; return when all admitted jobs are done.

        The sink writers must be running (``BatchWriter.run``) in an enclosing task group.
        """
        self._tell_capacity()
        deliveries = self.source.deliveries()
        try:
            async with anyio.create_task_group() as jobs:
                self._jobs_scope = jobs.cancel_scope
                with self._stop_reading:
                    while self.max_jobs is None or self.stats.received < self.max_jobs:
                        # Room first, then the next job: the source is read only as far
                        # as there is room for what it yields.
                        self._follow_limit()
                        await self.admission.acquire()
                        try:
                            delivery = await anext(deliveries)
                        except StopAsyncIteration:
                            self.admission.release()
                            break
                        except BaseException:
                            self.admission.release()
                            raise
                        self.stats.received += 1
                        if self._observer is not None:
                            self._observer.received(delivery)
                        jobs.start_soon(self._handle, delivery)
                # Close the generator here, inside the task group's cancel scope, so the
                # source sees the consumer stop (it pulls nothing more).
                with anyio.CancelScope(shield=True):
                    await deliveries.aclose()
        finally:
            self.stats.finished_at = time.monotonic()
            if self.models.priced:
                self.stats.cost_usd = sum(self.models.spent_usd.values())
            self.stats.budget_exhausted = self.budget_exhausted
        return self.stats

    async def _handle(self, delivery: Delivery) -> None:
        admitted_at = time.monotonic()
        admitted = True

        def leave_admission() -> None:
            nonlocal admitted
            if admitted:
                admitted = False
                self._follow_limit()
                self.admission.release()

        try:
            with self._job_span(delivery):
                await self._run_job(delivery, leave_admission)
        finally:
            leave_admission()
            if self._observer is not None:
                self._observer.finished(time.monotonic() - admitted_at)

    def _job_span(self, delivery: Delivery) -> AbstractContextManager[Any]:
        if self.tracing is None:
            return _NO_SPAN
        info = delivery.source_info or {}
        return self.tracing.job(
            delivery.traceparent,
            {
                "messaging.message.id": info.get("message_id"),
                "messaging.delivery_attempt": info.get("delivery_attempt"),
            },
        )

    def _span(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        return _NO_SPAN if self.tracing is None else self.tracing.span(name, **attributes)

    async def _run_job(self, delivery: Delivery, leave_admission: Callable[[], None]) -> None:
        try:
            outcome = await self._process(delivery)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self._give_back(delivery)
            raise
        except Exception:
            # A bug must cost one job, not the worker: hand it back or count it lost.
            log.exception("job_crashed")
            outcome = _Outcome("retry")
        with anyio.CancelScope(shield=True):
            await self._finish(delivery, outcome, leave_admission)

    async def _give_back(self, delivery: Delivery) -> None:
        try:
            await delivery.nack()
        except Exception as exc:
            log.warning(
                "nack_failed",
                extra={"error_type": type(exc).__name__, **_delivery_fields(delivery)},
            )
        self.stats.nacked += 1
        if delivery.redeliverable:
            log.info("job_nacked", extra=_delivery_fields(delivery))

    async def _process(self, delivery: Delivery) -> _Outcome:
        started = time.monotonic()
        try:
            job = parse_job(delivery.data, default_id=delivery.default_id)
        except JobError as exc:
            job_id = exc.job_id or fallback_id(delivery.data, delivery.default_id)
            if job_id in self.done_ids:
                return _Outcome("skip")
            return self._dead(job_id, None, exc.type, exc.message, 0, delivery)
        if job.id in self.done_ids:
            return _Outcome("skip")
        problem = self._unservable(job)
        if problem is not None:
            return self._dead(job.id, job.image_uri, "invalid_job", problem, 0, delivery)
        reuse = self.reuse
        if reuse is None:
            return await self._describe(job, delivery, started)
        # Exactly once per job id: a job whose record exists, or whose first delivery is
        # being worked on (here or by another replica), does not call the model again.
        fingerprint = job_fingerprint(
            job.image_uri,
            job.prompt,
            {"tier": job.tier, "generation": job.generation, "schema": job.schema},
        )
        record, claim = await reuse.find_or_claim(
            f"job:{job.id}", lambda: reuse.record(job.id, fingerprint)
        )
        if record is not None:
            reuse.duplicates_suppressed += 1
            # The very same record, field order included (image_uri second, as written
            # the first time), so a consumer that compares or hashes records sees one.
            again = {"id": record.get("id", job.id), "image_uri": redact(job.image_uri)}
            return _Outcome("ok", {**again, **record})
        try:
            outcome = await self._describe(job, delivery, started)
            if outcome.kind == "ok" and outcome.record is not None:
                await reuse.remember_record(job.id, fingerprint, outcome.record)
            return outcome
        finally:
            await reuse.release(f"job:{job.id}", claim)

    def _unservable(self, job: Job) -> str | None:
        """Why no request could be made for ``job`` (an unknown schema, a tier no
        endpoint serves), or None."""
        if job.schema is not None and (self.schemas is None or not self.schemas.knows(job.schema)):
            return f"unknown schema {job.schema!r} (configure it under [schemas])"
        tier = job.tier or self.default_tier
        if not self.models.serves(tier):
            return f"no endpoint serves tier {tier!r}" + (
                " (Flex PayGo needs the global endpoint)" if tier == "flex" else ""
            )
        return None

    async def _describe(self, job: Job, delivery: Delivery, started: float) -> _Outcome:
        """Image -> (reused answer, or model call and schema check) -> record."""
        try:
            with self._span("image.resolve"):
                url, held = await self.images.resolve_held(job.image_uri)
        except JobError as exc:
            return self._dead(job.id, job.image_uri, exc.type, exc.message, 0, delivery)
        schema = self.schemas.get(job.schema) if self.schemas is not None else None
        settings = {**self.generation, **(job.generation or {})}
        tier = job.tier or self.default_tier
        reuse = self.reuse
        key: str | None = None
        claim: str | None = None
        try:
            if reuse is not None:
                key = content_key(
                    await self._identity(reuse, job.image_uri, url),
                    job.prompt or self.prompt,
                    self.models.model,
                    {**settings, "schema": schema.digest if schema is not None else None},
                )
                image_key = key
                stored, claim = await reuse.find_or_claim(
                    f"img:{key}", lambda: reuse.answer(image_key)
                )
                if stored is not None:
                    reuse.hits += 1
                    return _Outcome("ok", self._cached_record(job, stored, tier, started, delivery))
            extra = dict(settings)
            if schema is not None:
                extra["response_format"] = schema.response_format
            call = ModelCall(url, job.prompt, tier, extra or None)
            state = RetryState(started_at=started)
            try:
                answer = await self._ask(call, state)
                output: Any = None
                cost = answer.cost_usd
                if schema is not None:
                    output, mismatch = schema.check(answer.text)
                    if mismatch is not None:
                        # Once more, telling the model what was wrong; then it is dead.
                        retry_call_ = replace(call, repair=(answer.text, repair_prompt(mismatch)))
                        answer = await self._ask(retry_call_, state)
                        cost = _add_costs(cost, answer.cost_usd)
                        output, mismatch = schema.check(answer.text)
                        if mismatch is not None:
                            return self._dead(
                                job.id,
                                job.image_uri,
                                "schema_mismatch",
                                f"the answer does not match schema {schema.name!r}: {mismatch}",
                                state.attempts,
                                delivery,
                            )
            except DrainRequested:
                return _Outcome("drained")
            except ServiceError as exc:
                return self._failed(job, exc, state, delivery)
            finally:
                self._end_backoff(state)
            answer.cost_usd = cost
            if reuse is not None and key is not None:
                await reuse.remember_answer(
                    key, StoredAnswer(answer.text, output, answer.model, answer.usage)
                )
            record = result_record(
                job,
                answer,
                attempts=state.attempts,
                started_at=started,
                source=delivery.source_info,
            )
            if schema is not None:
                record["output"] = output
            return _Outcome("ok", record)
        finally:
            # The inlined image is not needed once the model has answered (or given up).
            self.images.release(held)
            if reuse is not None and key is not None:
                await reuse.release(f"img:{key}", claim)

    async def _ask(self, call: ModelCall, state: RetryState) -> Answer:
        return await retry_call(
            lambda: self._call_model(call, state),
            self.retry,
            state=state,
            on_retry=self._note_retry,
        )

    async def _identity(self, reuse: Reuse, uri: str, url: str) -> str:
        try:
            return await reuse.identity(uri, url)
        except (JobError, ServiceError) as exc:
            # The worker may not read what Vertex AI can (its own service agent reads
            # gs://): then the image is known by its URI.
            log.info("image_identity_by_uri", extra={"error": str(exc)[:200]})
            return uri

    def _cached_record(
        self, job: Job, stored: StoredAnswer, tier: Tier, started: float, delivery: Delivery
    ) -> Record:
        answer = Answer(
            stored.text,
            stored.model,
            stored.usage,
            None,
            endpoint="",
            tier=tier,
            cost_usd=0.0 if self.models.priced else None,
        )
        record = result_record(
            job, answer, attempts=0, started_at=started, source=delivery.source_info
        )
        record["endpoint"] = None  # no endpoint answered: the store did
        if stored.output is not None:
            record["output"] = stored.output
        record["cached"] = True
        return record

    def _end_backoff(self, state: RetryState) -> None:
        if id(state) in self._backing_off:
            self._backing_off.discard(id(state))
            self._follow_limit()

    async def _call_model(self, call: ModelCall, state: RetryState) -> Answer:
        self._end_backoff(state)
        # Waiting for a slot counts against the job's deadline: when every endpoint is
        # out, the job waits, but not forever.
        deadline = self.retry.deadline_s
        timeout_s = (
            None if deadline is None else max(0.0, deadline - (time.monotonic() - state.started_at))
        )
        with anyio.CancelScope() as waiting:
            if self._draining:
                waiting.cancel()
            self._waiting_for_slot.add(waiting)
            try:
                slot = await self.models.acquire(call.tier, timeout_s=timeout_s)
            finally:
                self._waiting_for_slot.discard(waiting)
        if waiting.cancelled_caught:
            raise DrainRequested
        return await slot.describe(call)

    def _note_retry(self, exc: BaseException, kind: Kind, delay: float, state: RetryState) -> None:
        if delay > 0:
            self._backing_off.add(id(state))
            self._follow_limit()
        self.stats.retries += 1
        if kind == "rate_limited":
            self.stats.rate_limited += 1
        log.debug(
            "retry_scheduled",
            extra={
                "error_type": type(exc).__name__,
                "attempt": state.attempts,
                "delay_s": round(delay, 3),
            },
        )

    def _failed(
        self, job: Job, exc: ServiceError, state: RetryState, delivery: Delivery
    ) -> _Outcome:
        if exc.kind == "permanent":
            if exc.code == "empty_answer":
                message = f"the model returned no text ({exc.message})"
            else:
                message = f"the model refused the request (HTTP {exc.status}): {exc.message}"
            return self._dead(
                job.id, job.image_uri, "model_rejected", message, state.attempts, delivery
            )
        if delivery.redeliverable:
            return _Outcome("retry")
        elapsed_s = time.monotonic() - state.started_at
        message = (
            f"gave up after {state.attempts} attempts in {elapsed_s:.1f}s; "
            f"last error: {f'HTTP {exc.status}' if exc.status else exc.code}"
        )
        return self._dead(
            job.id, job.image_uri, "retries_exhausted", message, state.attempts, delivery
        )

    def _dead(
        self,
        job_id: str,
        uri: str | None,
        type_: ErrorType,
        message: str,
        attempts: int,
        delivery: Delivery,
    ) -> _Outcome:
        return _Outcome(
            "dead",
            error_record(
                job_id=job_id,
                image_uri=uri,
                error_type=type_,
                message=message,
                attempts=attempts,
                raw=delivery.data,
                source=delivery.source_info,
            ),
        )

    async def _finish(
        self, delivery: Delivery, outcome: _Outcome, leave_admission: Callable[[], None]
    ) -> None:
        if outcome.kind == "skip":
            self.stats.skipped += 1
            await self._ack(delivery)
            return
        if outcome.kind == "drained":
            await self._give_back(delivery)
            return
        if outcome.kind == "retry":
            if delivery.redeliverable:
                await self._give_back(delivery)
            else:
                self.stats.failed += 1
            return
        record, ok = outcome.record, outcome.kind == "ok"
        assert record is not None
        if self._handoff is not None:
            # The record is all this job still needs: let the next job in while it waits.
            await self._handoff.acquire()
            leave_admission()
        try:
            await self._store(delivery, record, ok)
        finally:
            if self._handoff is not None:
                self._handoff.release()

    async def _store(self, delivery: Delivery, record: Record, ok: bool) -> None:
        """Write the record (results or dead letters), then ack; hand back on failure."""
        if self.tracing is not None:
            # A published result carries the job's trace on (worker/pubsub/messages.py).
            record.setdefault("traceparent", self.tracing.traceparent())
        try:
            try:
                with self._span("sink.write", sink="results" if ok else "dead_letter"):
                    await (self.results if ok else self.dead_letter).put(record)
            except RecordRejected as exc:
                if not ok:
                    raise SinkFailed(f"the dead-letter sink refused the record: {exc}") from None
                # The result sink will never take this record: it becomes a dead letter.
                record, ok = self._rejected(record, str(exc), delivery), False
                await self.dead_letter.put(record)
        except (SinkFailed, RecordRejected) as exc:
            log.error(
                "sink_write_failed",
                extra={"job_id": record["id"], "error": str(exc), **_delivery_fields(delivery)},
            )
            if delivery.redeliverable:
                await self._give_back(delivery)
            else:
                self.stats.failed += 1
            return
        if ok:
            self.stats.ok += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "job_succeeded",
                    extra={
                        "job_id": record["id"],
                        "attempt": record.get("attempts"),
                        "latency_s": record.get("latency_s"),
                        **_delivery_fields(delivery),
                    },
                )
        else:
            self.stats.dead_lettered += 1
            err = record["error"]
            by_type = self.stats.dead_lettered_by_type
            by_type[err["type"]] = by_type.get(err["type"], 0) + 1
            log.warning(
                "job_dead_lettered",
                extra={
                    "job_id": record["id"],
                    "error_type": err["type"],
                    "reason": err["message"],
                    "attempt": record.get("attempts"),
                    **_delivery_fields(delivery),
                },
            )
        await self._ack(delivery)

    def _rejected(self, record: Record, reason: str, delivery: Delivery) -> Record:
        dead = self._dead(
            str(record["id"]),
            record.get("image_uri"),
            "sink_rejected",
            f"the result sink refused the record: {reason}",
            int(record.get("attempts") or 0),
            delivery,
        )
        assert dead.record is not None
        return dead.record

    async def _ack(self, delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except Exception as exc:
            # The record is durable; the queue will redeliver and the id dedupes it.
            log.warning(
                "ack_failed",
                extra={"error_type": type(exc).__name__, **_delivery_fields(delivery)},
            )


def _add_costs(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b
