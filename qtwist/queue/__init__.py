"""The durable queue: qmail-queue's promise (250 only once the message is on
disk) kept with a log-structured layout instead of a file per message.

Why a log: one 10 KiB message as qmail stores it costs several file creates,
renames and deletes; on ext4 every delete makes later creates slower for
minutes.  Here accepted messages are appended to a segment file and many
concurrent sessions share one fdatasync (group commit, on a writer thread, so
the reactor never waits on the disk).  Delivery results are appended as small
records to the message's own segment; a segment file is removed once every
message in it has ended, so deletes are rare (one per segment, not per message).

Layout of ``HOME/queue``::

    seg/NNNNNNNNNNNN   segment logs, named by the first message id they hold
    corrupt/           segment files (or copies) that could not be read cleanly
    rm/                removal requests from ``qtwist queue rm`` while the server runs
    todo/              messages from ``qtwist sendmail``, waiting for the server to queue them
    flush              touched by ``qtwist queue flush``: retry everything now
    lock               flock-ed by the running server
    key                the key of the record headers' MACs (see records)

The modules, one job each:

    records  the record format, and reading segments back (recovery, qstat)
    writer   the group-commit writer thread
    store    ``Queue``: the running server's handle (accept, results, ends)
    admin    what ``qtwist`` asks of a queue (qstat, qread, rm, flush) and
             the server's side of the rm/flush requests
    todo     the pickup directory that ``qtwist sendmail`` writes

The queue knows envelopes, not routes: whether a recipient is local or
remote is qmail-send's decision (``send.Scheduler``), made after queueing.
"""

from qtwist.queue.records import (BOUNCED, DELIVERED, FAILED, PENDING, QueuedMessage, QueueError,
                                  Recipient)
from qtwist.queue.store import Queue

__all__ = ["BOUNCED", "DELIVERED", "FAILED", "PENDING", "Queue", "QueueError", "QueuedMessage", "Recipient"]
