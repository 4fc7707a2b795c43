"""PostgreSQL snapshots (``pg_current_snapshot()``) on the client side.

The listener's position on a channel is a snapshot S: every event whose
transaction is visible in S has been handled. Events of transactions not visible
in S are handled by id (the dispatcher keeps their ids). This is what makes
catch-up safe past the outbox gap: log ids are assigned at insert time, commit
order is decided later, so ``id > last_seen`` would skip rows (README: the outbox gap).
"""

import attrs


@attrs.frozen(slots=True)
class Snapshot:
    xmin: int
    xmax: int
    xip: frozenset = frozenset()

    @classmethod
    def parse(cls, text):
        """Parse ``pg_snapshot`` text output, e.g. ``'10:20:12,15'``."""
        xmin, xmax, xip = text.split(":")
        ids = frozenset(int(x) for x in xip.split(",")) if xip else frozenset()
        return cls(int(xmin), int(xmax), ids)

    def __str__(self):
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"

    def visible(self, xid):
        """True if transaction *xid* had committed (or aborted) when the snapshot was taken."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)

    def covers(self, other):
        """True if every transaction visible in *other* is visible in this snapshot.

        Exact for snapshots of one cluster: a transaction visible in *other* is below
        other.xmax and not in other.xip, so it is visible here unless it is at or above
        our xmax or listed in our xip.
        """
        if self.xmax < other.xmax:
            return False
        return all(x >= other.xmax or x in other.xip for x in self.xip)
