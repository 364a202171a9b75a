"""qmail-send's job: route, schedule deliveries, retry, give up, bounce.

As qmail-send preprocesses a queued message, the scheduler decides for each
recipient whether it is local or remote (``policy.channel_for``), once the
message is in the queue.  Every pending recipient is then either ready (a
deque per channel) or waiting for its retry time (one heap for both
channels), so each event costs O(log n) whatever the size of the queue.
Local deliveries, at most concurrencylocal at once, go to the local channel
(the qmail-lspawn child, lspawn.py); remote ones, all recipients of one
domain in one SMTP transaction, at most concurrencyremote at once, to the
remote channel (remote.py).  Messages ``qtwist sendmail`` left in queue/todo/
are queued once a second (and at start), with the reading done off the
reactor thread.

All time is the clock's (``IReactorTime.seconds``), so tests drive retries
and queuelifetime on ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import re
import signal
import threading
from collections import deque
from typing import Callable, Coroutine

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from qtwist import bounce
from qtwist.control import Settings
from qtwist.delivery import ILocalDelivery, IRemoteDelivery, Outcome
from qtwist.hooks import Hooks, Outbound, PluginContext
from qtwist.inject import received_header
from qtwist.periodic import Periodic
from qtwist.policy import channel_for, split_address
from qtwist.queue import BOUNCED, DELIVERED, FAILED, PENDING, Queue, QueuedMessage
from qtwist.queue.admin import take_flush_request, take_removal_requests
from qtwist.queue.todo import remove_todo, take_todo

log = Logger(namespace="qtwist.send")

CHANSKIP = {"local": 10, "remote": 20}
BODY_CACHE_LIMIT = 64 * 1024 * 1024
POLL_INTERVAL = 1.0
STOP_GRACE = 30.0
LOG_INTERVAL = 0.05
# qmail-send's logsafe(): newlines become '/', and anything outside '!'..'~'
# (and '%') becomes '_', so one delivery is one word-split line.
UNSAFE_IN_LOG = re.compile(r"[^!-$&-~]")


def log_safe(text: str) -> str:
    """Text from outside (an envelope address, a delivery report) as
    qmail-send logs it: no NUL, CR or 8-bit byte reaches the log."""
    return UNSAFE_IN_LOG.sub("_", text.replace("\n", "/"))


def next_retry(born: float, now: float, channel: str) -> float:
    """qmail-send's schedule: birth + (isqrt(age) + chanskip)²."""
    age = max(0, int(now - born))
    return born + (math.isqrt(age) + CHANSKIP[channel]) ** 2


class SendLog:
    """qmail-send's log lines, handed to the log every LOG_INTERVAL seconds.

    One log event per line cost more CPU than the deliveries it reported
    (formatting a timestamp and a system tag, and a write, each time); the
    lines of one interval share one event, the later ones on continuation
    lines.
    """

    def __init__(self, clock):
        self.clock = clock
        self.lines: list[str] = []
        self.pending = None

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.pending is None:
            self.pending = self.clock.callLater(LOG_INTERVAL, self.flush)

    def flush(self) -> None:
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        lines, self.lines = self.lines, []
        if lines:
            log.info("{lines}", lines="\n".join(lines))


class Job:
    """One delivery: a local recipient, or the recipients of one remote domain."""

    __slots__ = ("message", "channel", "indexes", "domain")

    def __init__(self, message: QueuedMessage, channel: str, indexes: list[int], domain: str = ""):
        self.message = message
        self.channel = channel
        self.indexes = indexes
        self.domain = domain


class Scheduler(Service):
    """Delivers what the queue holds; the SMTP server hands it new messages.

    ``local`` and ``remote`` are the two delivery channels; ``local`` is
    started and stopped with the scheduler, since a stop must first let the
    deliveries it holds finish."""

    def __init__(self, queue: Queue, settings: Callable[[], Settings], local: ILocalDelivery,
                 remote: IRemoteDelivery, clock: IReactorTime, hooks: Hooks | None = None,
                 plugin_context: PluginContext | None = None):
        self.hooks = hooks
        self.plugin_context = plugin_context
        self.queue = queue
        self.settings = settings
        self.local = local
        self.remote = remote
        self.clock = clock
        self.ready = {"local": deque(), "remote": deque()}
        self.in_progress = {"local": 0, "remote": 0}
        self.waiting: list[tuple[float, int, Job]] = []
        self._sequence = itertools.count()
        self._deliveries = itertools.count(1)
        self._timer = None
        self._poller = Periodic("queue requests: looking at queue/rm/, queue/flush and queue/todo/",
                                self._poll_requests, POLL_INTERVAL, clock, now=True)
        self._pickup: Deferred | None = None
        self._cached_bytes = 0
        self._removed: set[int] = set()
        self._work: set[Deferred] = set()
        self.log = SendLog(clock)

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        call_from_thread = getattr(self.clock, "callFromThread", None)
        if call_from_thread is not None and threading.current_thread() is threading.main_thread():
            # qmail-send retries everything at once on SIGALRM; so do we.
            signal.signal(signal.SIGALRM, lambda *_: call_from_thread(self.flush))
        self.local.start()
        for message in self.queue.open():
            self._resume(message)
        # A big queue is many long-lived objects: keep the garbage collector
        # from walking all of them again and again while mail flows.
        gc.freeze()
        self._poller.startService()
        self._pump()

    def stopService(self) -> Deferred:
        """Start nothing new; let deliveries in progress finish and record their
        results (as qmail-send's exitasap does), then close the queue.  One that
        outlasts STOP_GRACE is retried after the next start."""
        super().stopService()
        if self._poller.running:
            self._poller.stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._pickup is not None:
            # Messages it is queueing must leave todo/, or the next start queues them again.
            await self._pickup
        if self._work:
            if self._deliveries_running():
                self.log(f"stopping: waiting for {self._deliveries_running()} deliveries in progress")
            waiting = self.settled()
            giving_up = self.clock.callLater(STOP_GRACE, waiting.cancel)
            try:
                await waiting
            except CancelledError:
                self.log(f"stopping: {self._deliveries_running()} deliveries still running; "
                         f"they are retried after the next start")
            if giving_up.active():
                giving_up.cancel()
        await self.local.stop()
        self.log.flush()
        await self.queue.close()

    @property
    def unfinished(self) -> int:
        """How many deliveries, bounces and ends are under way."""
        return len(self._work)

    def settled(self) -> Deferred:
        """Fires once the work started so far (deliveries with their results,
        bounces, ends) is done; what that work starts in turn is waited for too.
        Cancelling it ends the wait, never the work."""
        settled: Deferred = Deferred()

        def look(_: object = None) -> None:
            if settled.called:
                return
            if self._work:
                DeferredList(list(self._work), consumeErrors=True).addBoth(look)
            else:
                settled.callback(None)
        look()
        return settled

    def _deliveries_running(self) -> int:
        return self.in_progress["local"] + self.in_progress["remote"]

    def _track(self, work: Coroutine, what: str) -> Deferred:
        """Run ``work``, which ``settled`` and a stop wait for; a crash is logged."""
        running = Deferred.fromCoroutine(work)
        self._work.add(running)
        running.addErrback(lambda failure: log.failure("{what} failed", failure, what=what))
        running.addBoth(lambda _: self._work.discard(running))
        return running

    # -- entry points ---------------------------------------------------------

    def submit(self, message: QueuedMessage, uid: int = 0) -> None:
        """A freshly queued message (already durable); ``uid`` injected it locally."""
        self.log(f"new msg {message.id}")
        self.log(f"info msg {message.id}: bytes {message.size} from <{log_safe(message.sender)}> "
                 f"qp {message.id} uid {uid}")
        if message.body is not None:
            if self._cached_bytes + message.size > BODY_CACHE_LIMIT:
                message.body = None
            else:
                self._cached_bytes += message.size
        self._enqueue(message, range(len(message.recipients)), ready=True)
        self._pump()

    def _resume(self, message: QueuedMessage) -> None:
        """A message found in the queue at start."""
        if message.resolved:
            self._track(self._finish(message), f"finishing msg {message.id}")
            return
        if any(r.state == FAILED for r in message.recipients):
            self._track(self._bounce(message), f"bouncing msg {message.id}")
        pending = [i for i, r in enumerate(message.recipients) if r.state == PENDING]
        self._enqueue(message, pending, ready=False)

    def _enqueue(self, message: QueuedMessage, indexes, ready: bool) -> None:
        """qmail-send's preprocessing: each recipient to the local or the
        remote channel, remote ones grouped by domain."""
        settings = self.settings()
        remote_groups: dict[tuple[str, float], list[int]] = {}
        for index in indexes:
            recipient = message.recipients[index]
            if channel_for(recipient.address, settings) == "local":
                self._place(Job(message, "local", [index]), recipient.next_try, ready)
            else:
                _, domain = split_address(recipient.address)
                remote_groups.setdefault((domain, recipient.next_try), []).append(index)
        for (domain, next_try), group in remote_groups.items():
            self._place(Job(message, "remote", group, domain), next_try, ready)

    def _place(self, job: Job, when: float, ready: bool) -> None:
        if ready or when <= self.clock.seconds():
            self.ready[job.channel].append(job)
        else:
            heapq.heappush(self.waiting, (when, next(self._sequence), job))
            self._arm_timer()

    def flush(self) -> None:
        """Retry everything that waits (qmail-send's SIGALRM)."""
        while self.waiting:
            _, _, job = heapq.heappop(self.waiting)
            self.ready[job.channel].append(job)
        self._pump()

    # -- timing -----------------------------------------------------------------

    def _arm_timer(self) -> None:
        if not self.waiting:
            return
        delay = max(0.0, self.waiting[0][0] - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self.waiting and self.waiting[0][0] <= now:
            _, _, job = heapq.heappop(self.waiting)
            self.ready[job.channel].append(job)
        self._arm_timer()
        self._pump()

    def _poll_requests(self) -> Deferred | None:
        """The look at queue/rm/, queue/flush and queue/todo/, at start and
        once a second."""
        for message_id in take_removal_requests(self.queue.dir):
            message = self.queue.messages.get(message_id)
            if message is not None and message_id not in self._removed:
                self._removed.add(message_id)
                self.log(f"removed msg {message_id} by request")
                self._track(self._end(message, "removed"), f"removing msg {message_id}")
        if take_flush_request(self.queue.dir):
            self.log("flush: retrying every deferred delivery now")
            self.flush()
        if self._pickup is None and self.running:
            # The next look waits for this pickup, and its failure is the look's.
            self._pickup = Deferred.fromCoroutine(self._pick_up())
            return self._pickup.addBoth(self._pickup_ended)
        return None

    # -- messages from qtwist sendmail ------------------------------------------------

    def _pickup_ended(self, result: object) -> object:
        self._pickup = None
        return result

    async def _pick_up(self) -> None:
        """Queue what ``qtwist sendmail`` left in todo/, a batch at a time, so a
        flood of injections never holds much memory at once."""
        while await self._take_todo():
            pass

    async def _take_todo(self) -> bool:
        """qmail-queue's work for injected messages: each todo/ file is removed
        only once its message is durable in the queue, then it is delivered.
        True when a full batch went well and more files wait."""
        batch = await deferToThread(take_todo, self.queue.dir)
        for problem in batch.problems:
            log.warn("queue: {problem}", problem=problem)
        if not batch.messages:
            return False
        now = self.clock.seconds()
        accepting = [self.queue.accept(todo.sender, todo.recipients, received_header(todo.uid, now) + todo.body)
                     for todo in batch.messages]
        results = await DeferredList(accepting, consumeErrors=True)
        queued = []
        for todo, (ok, result) in zip(batch.messages, results):
            if ok:
                queued.append((todo, result))
            else:
                log.error("queue: could not queue queue/todo/{name}: {why}; it stays for the next try",
                          name=todo.path.name, why=result.getErrorMessage())
        await deferToThread(remove_todo, self.queue.dir, [todo.path for todo, _ in queued])
        for todo, message in queued:
            self.submit(message, uid=todo.uid)
        return batch.more and len(queued) == len(batch.messages)

    # -- running deliveries -------------------------------------------------------

    def _pump(self) -> None:
        if not self.running:
            return
        settings = self.settings()
        limits = {"local": settings.concurrencylocal, "remote": settings.concurrencyremote}
        for channel, ready in self.ready.items():
            while ready and self.in_progress[channel] < limits[channel]:
                job = ready.popleft()
                if job.message.id in self._removed or job.message.id not in self.queue.messages:
                    continue
                self.in_progress[channel] += 1
                self._track(self._run(job, settings), f"delivery of msg {job.message.id}")

    def _status(self, settings: Settings) -> None:
        self.log(f"status: local {self.in_progress['local']}/{settings.concurrencylocal} "
                 f"remote {self.in_progress['remote']}/{settings.concurrencyremote}")

    async def _run(self, job: Job, settings: Settings) -> None:
        message = job.message
        number = next(self._deliveries)
        for index in job.indexes:
            self.log(f"starting delivery {number}: msg {message.id} to {job.channel} "
                     f"{log_safe(message.recipients[index].address)}")
        self._status(settings)
        try:
            outcomes = await self._attempt(job, settings)
        except Exception as error:  # a bug or an OS error must not lose the message
            log.failure("delivery {d} crashed", d=number)
            outcomes = [Outcome.deferral(f"Internal error: {error!r}. (#4.3.0)")] * len(job.indexes)
        self.in_progress[job.channel] -= 1
        failed = False
        for index, outcome in zip(job.indexes, outcomes):
            outcome = self._judge(message, outcome, settings)
            # Like qmail's, a report ends with one newline: the logged text ends with '/'.
            report = log_safe(outcome.text.rstrip("\n"))
            self.log(f"delivery {number}: {outcome.kind}: {report}/")
            await self._record(job, index, outcome, settings)
            failed = failed or outcome.kind == "failure"
        self._status(settings)
        if message.id in self.queue.messages and message.id not in self._removed:
            if message.resolved:
                await self._finish(message)
            elif failed:
                await self._bounce(message)
        self._pump()

    async def _attempt(self, job: Job, settings: Settings) -> list[Outcome]:
        message = job.message
        if job.channel == "local":
            recipient = message.recipients[job.indexes[0]].address
            return [await self.local.deliver(message, recipient)]
        body = await self._body(message)
        recipients = [message.recipients[i].address for i in job.indexes]
        chain = self.hooks.chain(settings, "outbound") if self.hooks is not None else []
        if chain:
            outbound = Outbound(message.sender, job.domain, tuple(recipients), settings, self.plugin_context)
            answer = self.hooks.ask(chain, "outbound", outbound, body)
            if isinstance(answer, Deferred):
                answer = await answer
            if answer.kind in ("reject", "defer", "disconnect"):
                refused = Outcome.failure if answer.kind == "reject" else Outcome.deferral
                return [refused(f"A plugin refused the message: {answer.reply}") for _ in recipients]
            body = answer.header_block + body
        return await self.remote.deliver(settings, job.domain, message.sender, recipients, body)

    @staticmethod
    async def _body(message: QueuedMessage) -> bytes:
        """The message bytes: from memory while cached, else read in a thread."""
        return message.body if message.body is not None else await deferToThread(message.read_body)

    def _judge(self, message: QueuedMessage, outcome: Outcome, settings: Settings) -> Outcome:
        """A deferral after queuelifetime is the last try: it becomes a failure."""
        if outcome.kind == "deferral" and self.clock.seconds() >= message.born + settings.queuelifetime:
            return Outcome.failure(f"{outcome.text}\n{bounce.GIVING_UP}")
        return outcome

    async def _record(self, job: Job, index: int, outcome: Outcome, settings: Settings) -> None:
        message = job.message
        recipient = message.recipients[index]
        if message.id in self._removed:
            return
        if outcome.kind == "success":
            if outcome.forwards:
                await self._forward(message, recipient.address, outcome.forwards)
            recipient.state, recipient.text = DELIVERED, outcome.text
            self.queue.record_result(message, index)
            return
        if outcome.kind == "failure":
            recipient.state, recipient.text = FAILED, outcome.text
            self.queue.record_result(message, index)
            return
        recipient.next_try = min(next_retry(message.born, self.clock.seconds(), job.channel),
                                 message.born + settings.queuelifetime)
        recipient.text = outcome.text
        self.queue.record_deferral(message, index)
        self._place(Job(message, job.channel, [index], job.domain), recipient.next_try, ready=False)

    async def _forward(self, message: QueuedMessage, recipient: str, forwards: tuple[str, ...]) -> None:
        """A dot-qmail forward: a new message, durable before the original counts as delivered."""
        body = await self._body(message)
        forwarded = await self.queue.accept(message.sender, list(forwards),
                                            f"Delivered-To: {recipient}\n".encode() + body)
        self.submit(forwarded)

    async def _bounce(self, message: QueuedMessage) -> None:
        """Report the failed recipients to the sender now, while others may
        still wait for their retries (permanent failures bounce at once).
        They are marked before the first await, so a delivery of the same
        message ending meanwhile cannot report them twice."""
        failed = [i for i, r in enumerate(message.recipients) if r.state == FAILED]
        if not failed:
            return
        for index in failed:
            message.recipients[index].state = BOUNCED
        settings = self.settings()
        envelope = bounce.bounce_envelope(settings, message.sender)
        if envelope is None:
            self.log(f"triple bounce: discarding msg {message.id}")
        else:
            original = await self._body(message)
            failures = [(message.recipients[i].address, message.recipients[i].text) for i in failed]
            text = bounce.failure_notice(settings, message.sender, failures, original, self.clock.seconds())
            sender, recipient = envelope
            bounced = await self.queue.accept(sender, [recipient], text)
            self.log(f"bounce msg {message.id} qp {bounced.id}")
            self.submit(bounced)
        if message.id in self.queue.messages:
            for index in failed:
                self.queue.record_result(message, index)

    async def _finish(self, message: QueuedMessage) -> None:
        """Every recipient is done: bounce the failures, then end the message."""
        await self._bounce(message)
        await self._end(message, "done")
        self.log(f"end msg {message.id}")

    async def _end(self, message: QueuedMessage, why: str) -> None:
        if message.body is not None:
            self._cached_bytes -= message.size
        await self.queue.end(message, why)
