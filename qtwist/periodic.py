"""Jobs that run every so often and must never stop for good.

A ``LoopingCall`` whose function raises (or whose Deferred fails) stops for
good: a control reload, a grant clean-up or the queue's request poll would
then never run again until a restart, which is how a descriptor shortage
once left ``qtwist sendmail`` mail in queue/todo/ for ever.  ``Periodic``
logs the first failure with the job's name, logs once more when the job
works again, and keeps ticking either way.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="qtwist.periodic")


class Periodic(Service):
    """Runs ``job`` every ``interval`` seconds (at once too when ``now``) while
    the service runs.  ``job`` may return a Deferred: the next run waits for it."""

    def __init__(self, name: str, job: Callable[[], object], interval: float,
                 clock: IReactorTime | None = None, now: bool = False) -> None:
        self.name = name
        self.job = job
        self.interval = interval
        self.now = now
        self.failing = False
        self._loop = LoopingCall(self._run)
        if clock is not None:
            self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=self.now)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _run(self) -> Deferred | None:
        try:
            result = self.job()
        except Exception:
            self._failed(Failure())
            return None
        if isinstance(result, Deferred):
            return result.addCallbacks(self._worked, self._failed)
        self._worked()
        return None

    def _failed(self, failure: Failure) -> None:
        if not self.failing:
            log.failure("{name} failed; it runs again every {interval:g} s", failure, name=self.name,
                        interval=self.interval)
        self.failing = True

    def _worked(self, _: object = None) -> None:
        if self.failing:
            log.info("{name} works again", name=self.name)
        self.failing = False
