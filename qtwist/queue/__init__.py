"""The durable queue: qmail-queue's promise (250 only once the message is on
disk) kept with a log-structured layout instead of a file per message.

Why a log: one 10 KiB message as qmail stores it costs several file creates,
renames and deletes; on ext4 every delete makes later creates slower for
minutes.  Here accepted messages are appended to a segment file and many
concurrent sessions share one fdatasync (group commit, on a writer thread, so
the reactor never waits on the disk).  Delivery results are appended as small
records to the message's own segment; a segment file is removed once every
message in it has ended, so deletes are rare (one per segment, not per message).

Why an index beside the log: a queue can hold a million messages when a
big destination is down for a day.  Reading every segment at start, or
keeping every message in memory, made start time, memory and ``qstat`` grow
with the queue.  So the segments stay the truth (a message is durable there
before its 250) and an index in SQLite (index.sqlite, WAL) says, for every
message not ended, where it lies, what each recipient came to, and when it
is next due.  The server holds in memory only the messages due soonest, at
most ``control/queueactivelimit`` (as Postfix's qmgr_message_active_limit),
plus new ones; the others wait in the index until they are due.  SQLite
because it is in the standard library, keeps ordered indexes on disk, lets
``qtwist`` read while the server writes, and survives kill -9 at any point.

The index is kept by the writer thread after each batch, once the batch's
250s are out, so neither the reactor nor a client waits on it, and it does
not hear of most messages at all: one delivered within INDEX_AFTER seconds
of its 250 is written to the segment and ended there, costing the index
nothing (a batch that changes nothing in it costs no commit either).  Per
segment the index notes how far it reflects the log; recovery at start
reads only what lies beyond (the last moments before a crash), so the
first banner comes at once whatever the size of the queue.  A queue
without an index (an older server's) is read from the start, once.

Dead destinations cost one try: when no host of a domain takes a
connection, the scheduler puts off, untried, every message for it until the
domain's own retry time (qmail's schedule, counted from its first failure),
in bulk in the index (a narrow table, a chunk at a time).

Layout of ``HOME/queue``::

    seg/NNNNNNNNNNNN   segment logs, named by the first message id they hold
    index.sqlite       the index (with -wal and -shm): rebuilt from seg/ when missing
    corrupt/           segment files (or copies) that could not be read cleanly
    rm/                removal requests from ``qtwist queue rm`` while the server runs
    todo/              messages from ``qtwist sendmail``, waiting for the server to queue them
    flush              touched by ``qtwist queue flush``: retry everything now
    lock               flock-ed by the running server
    key                the key of the record headers' MACs (see records)

The modules, one job each:

    records  the record format, and reading segments back
    index    the index: what it keeps, recovery at start, what qtwist reads
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
