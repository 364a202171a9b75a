"""The I/O half of a pipelining line server: order, buffering, flow control,
long lines, bulk data and the idle timer (qtwist.pipelining), with a tiny
echo server over a StringTransport and a task.Clock."""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.defer import Deferred, fail
from twisted.logger import capturedLogs
from twisted.internet.testing import StringTransport

from qtwist.pipelining import MAX_LINE, PipeliningServer, write_now

IDLE = 60.0


class Collector:
    """Bulk data until a line with a lone '.'."""

    END = b"\r\n.\r\n"

    def __init__(self) -> None:
        self.data = b""

    def feed(self, chunk: bytes) -> None:
        self.data += chunk


class Echo(PipeliningServer):
    """``WAIT x`` answers only when the test fires its Deferred; ``DATA`` reads
    bulk data up to a lone '.' (``CHECKED DATA`` once the test fires its
    Deferred); anything else is echoed at once."""

    def __init__(self, clock: task.Clock) -> None:
        super().__init__(clock)
        self.lines: list[str] = []
        self.waiting: list[Deferred] = []
        self.messages: list[bytes] = []
        self.too_long = 0
        self.timeouts = 0

    def line_received(self, line: str):
        self.lines.append(line)
        if line.startswith("WAIT"):
            answer: Deferred = Deferred()
            answer.addCallback(lambda _: self.out.append(f"done {line}\r\n".encode()))
            self.waiting.append(answer)
            return answer
        if line == "CHECKED DATA":  # DATA after a check: the data waits in the buffer meanwhile
            checked: Deferred = Deferred()
            checked.addCallback(lambda _: self.start_bulk(feed_buffer=False))
            self.waiting.append(checked)
            return checked
        if line == "DATA":
            self.start_bulk(feed_buffer=True)
            return None
        if line == "BUG":
            return fail(RuntimeError("a handler with a bug"))
        self.out.append(f"echo {line}\r\n".encode())
        return None

    def start_bulk(self, feed_buffer: bool) -> None:
        self.out.append(b"354 go\r\n")
        self.bulk = Collector()
        if feed_buffer:
            self.bulk.feed(self._take_buffer())

    def bulk_ended(self) -> bool:
        data = self.bulk.data
        end = data.find(Collector.END)
        if end < 0:
            return False
        self.bulk = None
        self.messages.append(data[:end])
        self.out.append(b"250 stored\r\n")
        self._unread(data[end + len(Collector.END):])
        return True

    def line_too_long(self) -> None:
        self.too_long += 1
        self.out.append(b"500 line too long\r\n")

    def failed(self) -> None:
        self.out.append(b"451 internal error\r\n")

    def timed_out(self) -> None:
        self.timeouts += 1
        self._hang_up(b"421 timeout\r\n")


def connect() -> tuple[Echo, StringTransport, task.Clock]:
    clock = task.Clock()
    server = Echo(clock)
    transport = StringTransport()
    server.makeConnection(transport)
    server.start(IDLE)
    return server, transport, clock


def replies(transport: StringTransport) -> list[bytes]:
    """What the server wrote since the last look, line by line."""
    written = transport.value()
    transport.clear()
    return written.splitlines(keepends=True)


# -- order and buffering -------------------------------------------------------------------------

def test_lines_are_answered_in_order_in_one_write():
    server, transport, _ = connect()
    server.dataReceived(b"one\r\ntwo\r\nthree\r\n")
    assert replies(transport) == [b"echo one\r\n", b"echo two\r\n", b"echo three\r\n"]


def test_a_line_split_across_reads_is_handled_once_complete():
    server, transport, _ = connect()
    server.dataReceived(b"hel")
    server.dataReceived(b"lo\r")
    assert transport.value() == b""
    server.dataReceived(b"\n")
    assert replies(transport) == [b"echo hello\r\n"]


def test_bare_lf_ends_a_line_too_and_any_byte_survives():
    server, transport, _ = connect()
    server.dataReceived(b"caf\xe9\n")
    assert server.lines == ["caf\xe9"]
    assert replies(transport) == [b"echo caf\xc3\xa9\r\n"]


def test_replies_keep_their_order_while_a_handler_waits():
    server, transport, _ = connect()
    server.dataReceived(b"first\r\nWAIT check\r\nafter\r\n")
    assert replies(transport) == [b"echo first\r\n"]
    assert server.lines == ["first", "WAIT check"]  # "after" waits in the buffer
    server.dataReceived(b"later\r\n")
    assert server.lines == ["first", "WAIT check"]
    assert transport.value() == b""
    server.waiting[0].callback(None)
    assert replies(transport) == [b"done WAIT check\r\n", b"echo after\r\n", b"echo later\r\n"]


def test_a_client_that_keeps_sending_while_busy_is_paused_then_resumed():
    server, transport, _ = connect()
    server.dataReceived(b"WAIT x\r\n")
    flood = b"noop\r\n" * (MAX_LINE * 16 // 6 + 10)
    server.dataReceived(flood[:MAX_LINE])
    assert transport.producerState == "producing"  # a little input just waits
    server.dataReceived(flood[MAX_LINE:])
    assert transport.producerState == "paused"
    server.waiting[0].callback(None)
    assert transport.producerState == "producing"
    assert len(replies(transport)) == 1 + flood.count(b"\n")


def test_output_backpressure_stops_and_restarts_processing():
    server, transport, _ = connect()
    server.pauseProducing()  # the client does not read its replies
    assert transport.producerState == "paused"
    server.dataReceived(b"one\r\ntwo\r\n")
    assert transport.value() == b""
    assert server.lines == []
    server.resumeProducing()
    assert transport.producerState == "producing"
    assert replies(transport) == [b"echo one\r\n", b"echo two\r\n"]


def test_reading_resumes_only_when_both_reasons_to_stop_are_gone():
    server, transport, _ = connect()
    server.dataReceived(b"WAIT x\r\n")
    server.dataReceived(b"noop\r\n" * (MAX_LINE * 3))  # paused: "input"
    server.pauseProducing()  # and "output"
    server.waiting[0].callback(None)
    assert transport.producerState == "paused"
    # The running check's reply goes out; no further line is handled meanwhile.
    assert replies(transport) == [b"done WAIT x\r\n"]
    assert server.lines == ["WAIT x"]
    server.resumeProducing()
    assert transport.producerState == "producing"
    assert len(replies(transport)) == MAX_LINE * 3


def test_the_producer_is_registered_as_a_push_producer():
    server, transport, _ = connect()
    assert transport.producer is server
    assert transport.streaming


# -- long lines ----------------------------------------------------------------------------------

def test_a_too_long_line_is_reported_once_and_the_rest_of_it_discarded():
    server, transport, _ = connect()
    server.dataReceived(b"x" * (MAX_LINE + 10))
    assert server.too_long == 1
    server.dataReceived(b"y" * (MAX_LINE * 2))
    server.dataReceived(b"zzz\r\nnext\r\n")
    assert server.too_long == 1
    assert server.lines == ["next"]
    assert replies(transport) == [b"500 line too long\r\n", b"echo next\r\n"]


def test_a_too_long_line_that_arrives_whole_is_reported_and_skipped():
    server, transport, _ = connect()
    server.dataReceived(b"before\r\n" + b"x" * (MAX_LINE + 1) + b"\r\nafter\r\n")
    assert server.too_long == 1
    assert server.lines == ["before", "after"]
    assert replies(transport) == [b"echo before\r\n", b"500 line too long\r\n", b"echo after\r\n"]


def test_a_line_of_max_line_bytes_is_accepted():
    server, transport, _ = connect()
    server.dataReceived(b"x" * MAX_LINE + b"\n")
    assert server.too_long == 0
    assert server.lines == ["x" * MAX_LINE]


# -- bulk data -----------------------------------------------------------------------------------

def test_bulk_data_goes_to_the_reader_and_the_rest_back_to_lines():
    server, transport, _ = connect()
    server.dataReceived(b"DATA\r\nSubject: hi\r\n")
    assert replies(transport) == [b"354 go\r\n"]
    server.dataReceived(b"\r\nbody\r\n.\r\nafter\r\n")
    assert server.messages == [b"Subject: hi\r\n\r\nbody"]
    assert server.bulk is None
    assert server.lines == ["DATA", "after"]
    assert replies(transport) == [b"250 stored\r\n", b"echo after\r\n"]


def test_bulk_data_and_commands_pipelined_in_one_read():
    server, transport, _ = connect()
    server.dataReceived(b"DATA\r\nline\r\n.\r\nnoop\r\nDATA\r\nsecond\r\n.\r\n")
    assert server.messages == [b"line", b"second"]
    assert replies(transport) == [b"354 go\r\n", b"250 stored\r\n", b"echo noop\r\n",
                                  b"354 go\r\n", b"250 stored\r\n"]


def test_bulk_data_sent_while_a_check_runs_reaches_the_reader_after_it():
    server, transport, _ = connect()
    server.dataReceived(b"CHECKED DATA\r\nbody\r\n")
    server.dataReceived(b".\r\nnext\r\n")
    assert server.messages == []
    server.waiting[0].callback(None)  # the check agrees: bulk mode starts now
    assert server.messages == [b"body"]
    assert server.lines == ["CHECKED DATA", "next"]
    assert replies(transport) == [b"354 go\r\n", b"250 stored\r\n", b"echo next\r\n"]


# -- the idle timer ------------------------------------------------------------------------------

def test_the_idle_timer_fires_after_idle_limit_without_data():
    server, transport, clock = connect()
    clock.advance(IDLE - 1)
    assert server.timeouts == 0
    clock.advance(1)
    assert server.timeouts == 1
    assert transport.disconnecting
    assert transport.producer is None


def test_data_restarts_the_idle_time():
    server, _, clock = connect()
    clock.advance(IDLE - 1)
    server.dataReceived(b"noop\r\n")
    clock.advance(IDLE - 1)
    assert server.timeouts == 0
    clock.advance(1)
    assert server.timeouts == 1


def test_a_client_that_trickles_bytes_without_ending_a_line_still_times_out():
    server, _, clock = connect()
    for byte in b"NOOP":
        clock.advance(IDLE / 5)
        server.dataReceived(bytes([byte]))
    clock.advance(IDLE / 5)
    assert server.timeouts == 1
    assert server.lines == []


def test_a_line_of_bulk_data_counts_as_activity():
    server, _, clock = connect()
    server.dataReceived(b"DATA\r\n")
    clock.advance(IDLE - 1)
    server.dataReceived(b"a line of the message\r\n")
    clock.advance(IDLE - 1)
    assert server.timeouts == 0
    server.dataReceived(b"half a line")
    clock.advance(1)
    assert server.timeouts == 1


def test_a_client_that_reads_no_replies_is_cut_off_at_the_timeout():
    server, transport, clock = connect()
    server.pauseProducing()  # the transport's buffer is full: the client reads nothing
    server.dataReceived(b"NOOP\r\n")
    clock.advance(IDLE)
    assert transport.disconnected


def test_no_timeout_while_a_handler_is_busy_and_the_idle_time_starts_when_it_is_done():
    server, _, clock = connect()
    server.dataReceived(b"WAIT slow\r\n")
    clock.pump([IDLE] * 5)
    assert server.timeouts == 0
    server.waiting[0].callback(None)
    clock.advance(IDLE - 1)  # the client has the whole idle limit to send its next line
    assert server.timeouts == 0
    clock.advance(1)
    assert server.timeouts == 1


def test_connection_lost_cancels_the_idle_timer():
    server, _, clock = connect()
    server.connectionLost(None)
    assert clock.getDelayedCalls() == []
    clock.advance(IDLE * 2)
    assert server.timeouts == 0


def test_a_failing_handler_is_logged_and_answered_and_the_next_lines_go_on():
    server, transport, _ = connect()
    with capturedLogs() as events:
        server.dataReceived(b"BUG\r\nafter\r\n")
    assert replies(transport) == [b"451 internal error\r\n", b"echo after\r\n"]
    assert [event["log_failure"].value.args for event in events if "log_failure" in event] == [
        ("a handler with a bug",)]


# -- write_now -----------------------------------------------------------------------------------

def test_write_now_falls_back_to_write_on_other_transports():
    transport = StringTransport()
    write_now(transport, b"250 ok\r\n")
    write_now(transport, b"")
    assert transport.value() == b"250 ok\r\n"
