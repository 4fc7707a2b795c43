"""Reads of the event log shared by the lanes of one channel (a consumer group's
member holding several partitions of it; no thread of its own).

Every lane of a channel gets the same hints, and each would read the same rows to
keep only its partition's: k lanes, k reads of every row. Here a row is read by
the first lane that asks for it, and the other lanes take it from that read
(waiting for it if it is under way). Rows are shared by id, since each lane cuts
its batches at other points; a statement's range pages by their page. A result is
kept until every lane that may ask took it, or until newer ones push it out (KEEP);
a lane that finds nothing reads for itself, and so does one whose awaited read
failed or took longer than *wait_s*. The events are shared, not copied: each lane
hands only its own partition's to handlers, so no event object is delivered twice.
"""

import collections
import threading

# Entries kept at most (ids, and range pages of up to the listener's page_rows
# each), taken or not: the memory this may hold beyond the lanes' own (the pages
# are the lanes' own objects while they hold them). A lane has up to READ_AHEAD +
# SLICES_AHEAD + 2 pages under way (_fetch.py): twice that, so a slower lane still
# finds the pages a faster one read.
KEEP_IDS = 50_000
KEEP_PAGES = 18


class _Read:
    __slots__ = ("done", "result", "failed")

    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.failed = False

    def run(self, load, *args):
        try:
            self.result = load(*args)
        except BaseException:
            self.failed = True
            raise
        finally:
            self.done.set()
        return self.result


class SharedReads:
    def __init__(self, wait_s):
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._ids = collections.OrderedDict()       # (wire, id) -> [_Read, lanes still to take it]
        self._pages = collections.OrderedDict()     # key -> [_Read, lanes still to take it]

    def _take(self, table, key):
        """The entry's read, counted as taken (under the lock); None if absent."""
        entry = table.get(key)
        if entry is None:
            return None
        entry[1] -= 1
        if entry[1] <= 0:
            del table[key]
        return entry[0]

    @staticmethod
    def _put(table, key, read, others, keep):
        table[key] = [read, others]
        while len(table) > keep:
            table.popitem(last=False)

    def ids(self, wire, ids, readers, load):
        """``load(ids)``'s events (any order) for *readers* lanes, each row read once."""
        if readers <= 1:
            return load(ids)
        taken, missing = {}, []
        with self._lock:
            for ident in ids:
                read = self._take(self._ids, (wire, ident))
                if read is None:
                    missing.append(ident)
                else:
                    taken.setdefault(id(read), (read, []))[1].append(ident)
            mine = _Read()
            for ident in missing:
                self._put(self._ids, (wire, ident), mine, readers - 1, KEEP_IDS)
        events = mine.run(load, missing) if missing else []
        for read, wanted in taken.values():
            if read.done.wait(self._wait_s) and not read.failed:
                wanted = set(wanted)
                events = events + [e for e in read.result if e.id in wanted]
            else:
                events = events + load(wanted)
        return events

    def page(self, key, readers, load):
        """``load()``'s result for range page *key*, read once for *readers* lanes."""
        if readers <= 1:
            return load()
        with self._lock:
            read = self._take(self._pages, key)
            if read is None:
                mine = _Read()
                self._put(self._pages, key, mine, readers - 1, KEEP_PAGES)
        if read is None:
            return mine.run(load)
        if not read.done.wait(self._wait_s) or read.failed:
            return load()
        return read.result
