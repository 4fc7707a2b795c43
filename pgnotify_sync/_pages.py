"""Pages of the event log in memory (no I/O): how many rows the next page asks for
(``page_rows``), and a statement's page whose events are built as they are
delivered (``RangeRows``). The queries are in _eventlog.py."""

import itertools

from .events import DatabaseEvent

_repeat = itertools.repeat

# range_rows(previous=WIDE): the page before ended at a row too wide for the fast
# read; this one is read by bytes, RANGE_PAGE rows at most.
WIDE = -1


def page_rows(most, previous):
    """Rows to ask for in the next page, after one of *previous* rows (None: the
    first page). Each page query sizes every row it may return (the byte bound),
    so after a page cut short by wide rows the next asks for twice as many as it
    got, not *most*: reading n wide rows stays linear, not quadratic, in n."""
    if previous is None:
        return most
    return min(most, max(64, 2 * previous))


class RangeRows:
    """One page of a statement's rows: the parsed flat array [id, data, old, ...]
    of one (operation, table) and transaction, or events built already (``of``).

    Events are built by :meth:`events` when they are delivered, a chunk at a time:
    a page of 10,000 DatabaseEvents built at once outlives two of the cyclic
    collector's young generations and is traversed again by its full collections
    (a third of the time per event in a 100,000-row drain here); a chunk handed to
    the handlers and dropped dies young. The dicts of the rows are not tracked by
    the collector (only scalars inside), so the parsed page costs it nothing."""

    __slots__ = ("channel", "operation", "schema", "table", "xid", "flat", "ids", "built", "wide")

    def __init__(self, channel, operation, schema, table, xid, flat, ids, built=None, wide=False):
        self.channel, self.operation, self.schema, self.table = channel, operation, schema, table
        self.xid, self.flat, self.ids, self.built = xid, flat, ids, built
        self.wide = wide        # the page ends before a row too wide for the fast read

    @classmethod
    def of(cls, events):
        return cls(None, None, None, None, None, None, [e.id for e in events], events)

    def __len__(self):
        return len(self.ids)

    @property
    def previous(self):
        """What to pass as *previous* when reading on after this page."""
        return WIDE if self.wide else len(self.ids)

    def events(self, lo=0, hi=None):
        """The events of rows lo..hi-1 (all by default), in id order."""
        if self.built is not None:
            return self.built[lo:hi]
        hi = len(self.ids) if hi is None else min(hi, len(self.ids))
        flat = self.flat
        # map() over slices builds the events from C: a quarter cheaper than a
        # comprehension unpacking the flat list.
        return list(map(DatabaseEvent, _repeat(self.channel), _repeat(self.operation), _repeat(self.schema),
                        _repeat(self.table), flat[3 * lo + 1:3 * hi:3], flat[3 * lo + 2:3 * hi:3],
                        self.ids[lo:hi], _repeat(self.xid)))
