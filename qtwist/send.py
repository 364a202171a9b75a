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
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Coroutine

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
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
# At most this many held messages due late make room at once for messages
# due sooner that wait in the index.
MAKE_ROOM = 1000
# How often (seconds, and at start) segments mostly made of ended messages are compacted.
COMPACT_INTERVAL = 60.0
# Messages taken from the index at once: the reactor resumes them in one go.
TAKE_AT_ONCE = 1000
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


@dataclass
class Dead:
    """A destination no host of which took a connection: its messages wait,
    untried, until ``until`` (its own retry time, on qmail's schedule counted
    from the first failure ``since``)."""

    since: float
    until: float
    text: str


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
        # New messages go first: a flush or a backlog of retries never delays them.
        self.fresh = {"local": deque(), "remote": deque()}
        self.ready = {"local": deque(), "remote": deque()}
        self.in_progress = {"local": 0, "remote": 0}
        self.waiting: list[tuple[float, int, Job]] = []
        self._running: Counter[int] = Counter()  # deliveries in progress, per message
        self._dead: dict[str, Dead] = {}
        # When the first message only the index holds is due: None when there
        # is none, -inf when unknown; and the same for those let go while the
        # index was being asked.
        self._index_due: float | None = None
        self._released_due: float | None = None
        self._filler = Periodic("queue index: taking the messages due soonest", self._fill, POLL_INTERVAL, clock)
        self._compactor = Periodic("queue compaction", self._compact, COMPACT_INTERVAL, clock, now=True)
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
        # The first look at the index is short, so the listeners open at once
        # whatever the size of the queue; the filler takes the rest.
        first_look = min(self.settings().queueactivelimit, TAKE_AT_ONCE)
        first = self.queue.open(first_look)
        for message in first:
            self._resume(message)
        if len(first) >= first_look:
            self._index_due = -math.inf
        # A big queue is many long-lived objects: keep the garbage collector
        # from walking all of them again and again while mail flows.
        gc.freeze()
        self._poller.startService()
        self._filler.startService()
        self._compactor.startService()
        self._pump()

    def stopService(self) -> Deferred:
        """Start nothing new; let deliveries in progress finish and record their
        results (as qmail-send's exitasap does), then close the queue.  One that
        outlasts STOP_GRACE is retried after the next start."""
        super().stopService()
        for periodic in (self._poller, self._filler, self._compactor):
            if periodic.running:
                periodic.stopService()
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

    def _track(self, work: Coroutine | Deferred, what: str) -> Deferred:
        """Run ``work``, which ``settled`` and a stop wait for; a crash is logged."""
        running = ensureDeferred(work)
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
        self._enqueue(message, range(len(message.recipients)), ready=True, fresh=True)
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

    def _enqueue(self, message: QueuedMessage, indexes, ready: bool, fresh: bool = False) -> None:
        """qmail-send's preprocessing: each recipient to the local or the
        remote channel, remote ones grouped by domain."""
        settings = self.settings()
        remote_groups: dict[tuple[str, float], list[int]] = {}
        for index in indexes:
            recipient = message.recipients[index]
            if channel_for(recipient.address, settings) == "local":
                self._place(Job(message, "local", [index]), recipient.next_try, ready, fresh)
            else:
                _, domain = split_address(recipient.address)
                remote_groups.setdefault((domain, recipient.next_try), []).append(index)
        for (domain, next_try), group in remote_groups.items():
            self._place(Job(message, "remote", group, domain), next_try, ready, fresh)

    def _place(self, job: Job, when: float, ready: bool, fresh: bool = False) -> None:
        if ready or when <= self.clock.seconds():
            (self.fresh if fresh else self.ready)[job.channel].append(job)
        else:
            heapq.heappush(self.waiting, (when, next(self._sequence), job))
            self._arm_timer()

    def flush(self) -> None:
        """Retry everything that waits (qmail-send's SIGALRM), in the order it
        was due: first what the server holds, then, as room frees, what only
        the index holds.  Dead destinations are tried again too."""
        self._dead.clear()
        while self.waiting:
            _, _, job = heapq.heappop(self.waiting)
            self.ready[job.channel].append(job)
        if self._index_due is not None:
            self._track(self._flush_index(), "flushing the queue index")
        self._pump()

    async def _flush_index(self) -> None:
        flushed = await self.queue.flush()
        if flushed:
            self._index_due = -math.inf

    # -- what is held in memory --------------------------------------------------------

    def _current(self, job: Job) -> bool:
        """The job's message is still held, as this very object, and not being removed."""
        message = job.message
        return self.queue.messages.get(message.id) is message and message.id not in self._removed

    def _let_go(self, message: QueuedMessage) -> None:
        """After a deferral: past queueactivelimit, or when a message the index
        holds is due sooner, the index alone keeps this one until it is due."""
        due = self._releasable(message)
        if due is None:
            return
        over = len(self.queue.messages) > self.settings().queueactivelimit
        if over or (self._index_due is not None and due > self._index_due):
            self._release(message, due)

    def _releasable(self, message: QueuedMessage) -> float | None:
        """When a held message that only waits for retries is next due; None
        if it cannot be let go now (a delivery or its bounce is under way)."""
        if self.queue.messages.get(message.id) is not message or self._running[message.id]:
            return None
        if any(r.state == FAILED for r in message.recipients):
            return None
        return min((r.next_try for r in message.recipients if r.state == PENDING), default=None)

    def _release(self, message: QueuedMessage, due: float) -> None:
        self.queue.release(message)
        self._index_due = due if self._index_due is None else min(self._index_due, due)
        self._released_due = due if self._released_due is None else min(self._released_due, due)

    def _compact(self) -> Deferred:
        return self._track(self._compact_queue(), "compacting the queue")

    async def _compact_queue(self) -> None:
        """Held messages would keep a compacted segment for as long as they
        wait: those only waiting for a retry are let go, and moved at once."""
        moved, pinned = await self.queue.compact()
        let_go: set[int] = set()
        for message in filter(None, map(self.queue.messages.get, pinned)):
            due = self._releasable(message)
            if due is not None and message.segment is not None:
                let_go.add(message.segment.number)
                self._release(message, due)
        if let_go:
            moved += (await self.queue.compact(let_go))[0]
        if moved:
            self.log(f"compacted the queue: moved {moved} messages out of segments mostly ended")

    def _fill(self) -> Deferred | None:
        """Once a second: take the messages due soonest from the index while
        there is room under queueactivelimit; when there is none and one
        there is due, let go of held messages due later."""
        if self._index_due is None:
            return None
        limit = self.settings().queueactivelimit
        room = limit - len(self.queue.messages)
        if room <= 0:
            due_first = self._index_due
            if due_first <= self.clock.seconds():
                for when, _, job in heapq.nlargest(MAKE_ROOM, self.waiting):
                    if when <= due_first:
                        break
                    due = self._releasable(job.message)
                    if due is not None and due > due_first:
                        self._release(job.message, due)
            return None
        if len(self.waiting) > 2 * limit:
            self.waiting = [entry for entry in self.waiting if self._current(entry[2])]
            heapq.heapify(self.waiting)
        return self._track(self._take(), "taking the messages due soonest from the queue index")

    async def _take(self) -> None:
        """TAKE_AT_ONCE at a time, other work in between, while there is room."""
        while self.running:
            room = min(self.settings().queueactivelimit - len(self.queue.messages), TAKE_AT_ONCE)
            if room <= 0:
                return
            self._released_due = None
            taken, next_due = await self.queue.take_due(room)
            if next_due is None or (self._released_due is not None and self._released_due < next_due):
                next_due = self._released_due
            self._index_due = next_due
            for message in taken:
                self._resume(message)
            self._pump()
            if len(taken) < room:
                return

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
        in_index = self._remove_held(take_removal_requests(self.queue.dir))
        if in_index:
            self._track(self._remove_from_index(in_index), "removing messages by request")
        if take_flush_request(self.queue.dir):
            self.log("flush: retrying every deferred delivery now")
            self.flush()
        if self._pickup is None and self.running:
            # The next look waits for this pickup, and its failure is the look's.
            self._pickup = Deferred.fromCoroutine(self._pick_up())
            return self._pickup.addBoth(self._pickup_ended)
        return None

    def _remove_held(self, ids) -> list[int]:
        """End the messages of ``ids`` the server holds; returns the others."""
        in_index = []
        for message_id in ids:
            message = self.queue.messages.get(message_id)
            if message is None:
                in_index.append(message_id)
            elif message_id not in self._removed:
                self._removed.add(message_id)
                self.log(f"removed msg {message_id} by request")
                self._track(self._end(message, "removed"), f"removing msg {message_id}")
        return in_index

    async def _remove_from_index(self, ids: list[int]) -> None:
        """Those only the index holds; one the server took meanwhile is ended as held."""
        while ids:
            removed, held = await self.queue.remove(ids)
            for message_id in removed:
                self.log(f"removed msg {message_id} by request")
            ids = self._remove_held(held)

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
        now = self.clock.seconds()
        for channel in ("local", "remote"):
            fresh, ready = self.fresh[channel], self.ready[channel]
            while (fresh or ready) and self.in_progress[channel] < limits[channel]:
                job = (fresh or ready).popleft()
                if not self._current(job):
                    continue
                dead = self._dead.get(job.domain) if channel == "remote" else None
                if dead is not None and now < dead.until:
                    self._track(self._put_off(job, dead, settings), f"putting off msg {job.message.id}")
                    continue
                self.in_progress[channel] += 1
                self._running[job.message.id] += 1
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
        if job.channel == "remote":
            self._learn(job.domain, outcomes, settings)
        failed = False
        for index, outcome in zip(job.indexes, outcomes):
            outcome = self._judge(message, outcome, settings)
            # Like qmail's, a report ends with one newline: the logged text ends with '/'.
            report = log_safe(outcome.text.rstrip("\n"))
            self.log(f"delivery {number}: {outcome.kind}: {report}/")
            await self._record(job, index, outcome, settings)
            failed = failed or outcome.kind == "failure"
        self._status(settings)
        self._running[message.id] -= 1
        if not self._running[message.id]:
            del self._running[message.id]
        await self._settle(message, failed)
        self._pump()

    async def _settle(self, message: QueuedMessage, failed: bool) -> None:
        """After a try: end the message, bounce what failed, or let it wait."""
        if self.queue.messages.get(message.id) is message and message.id not in self._removed:
            if message.resolved:
                await self._finish(message)
            elif failed:
                await self._bounce(message)
            else:
                self._let_go(message)

    # -- dead destinations ---------------------------------------------------------------

    def _learn(self, domain: str, outcomes: list[Outcome], settings: Settings) -> None:
        """No host of ``domain`` took a connection: it is dead until its own
        retry time, and the messages for it the index holds wait until then,
        untried (one try, not one per message).  Any other answer revives it."""
        if not outcomes or not all(outcome.unreachable for outcome in outcomes):
            self._dead.pop(domain, None)
            return
        now = self.clock.seconds()
        dead = self._dead.get(domain)
        if dead is not None and now < dead.until:
            return
        since = dead.since if dead is not None else now
        until = next_retry(since, now, "remote")
        self._dead[domain] = Dead(since, until, outcomes[0].text)
        self.log(f"destination {log_safe(domain)} unreachable: its messages wait until {int(until)}")
        if self._index_due is not None:
            self._track(self.queue.put_off(domain, until, settings.queuelifetime), f"putting off {domain}")

    async def _put_off(self, job: Job, dead: Dead, settings: Settings) -> None:
        """A held message for a dead destination: deferred with the
        destination's last answer, untried."""
        message = job.message
        failed = False
        for index in job.indexes:
            outcome = self._judge(message, Outcome.deferral(dead.text), settings)
            report = log_safe(outcome.text.rstrip("\n"))
            self.log(f"delivery put off: msg {message.id} to remote {log_safe(message.recipients[index].address)}: "
                     f"{outcome.kind}: {report}/")
            await self._record(job, index, outcome, settings)
            failed = failed or outcome.kind == "failure"
        await self._settle(message, failed)

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
        next_try = next_retry(message.born, self.clock.seconds(), job.channel)
        dead = self._dead.get(job.domain) if job.channel == "remote" else None
        if dead is not None:
            next_try = max(next_try, dead.until)
        recipient.next_try = min(next_try, message.born + settings.queuelifetime)
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
