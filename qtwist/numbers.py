"""Numbers as control files, tcp.smtp, clients and queue files write them.

``str.isdigit`` also accepts digits ``int`` refuses (``²``) or reads as
another number (``٣`` is 3), and ``int`` refuses more than 4300 digits: a
field of junk must give "not a number", never an exception or a surprise.
"""

from __future__ import annotations

# More than any count, size or time qtwist reads (and than a 64-bit number).
MOST_DIGITS = 18


def decimal(text: str) -> int | None:
    """The value of ``text`` when it is 1 to MOST_DIGITS ASCII digits, else None."""
    if 0 < len(text) <= MOST_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None
