"""A channel's position: which events were handled already. Pure: no I/O, no
thread, no lock (the channel's worker is the only one that moves it).

The position is a snapshot S: every event of a transaction visible in S has been
handled. Events of transactions not visible in S are remembered as handled by id
(``ch.handled``), by statement (``ch.xranges``: first, last, n per transaction) or
by the cursor of a catch-up that stopped midway (``ch.partial``). An event is
fresh (delivered) iff none of these covers it: that drops the duplicates that
catch-up reads and live notifications produce, so each event is handled once.
"""


def handled_count(ch):
    """How many events of transactions not visible in the position were handled."""
    return len(ch.handled) + sum(n for ranges in ch.xranges.values() for _, _, n in ranges)


def seen(ch, ident, xid):
    """True if event *ident* of transaction *xid* was handled already."""
    pos = ch.position
    if pos is not None and (xid < pos.xmin or (xid < pos.xmax and xid not in pos.xip)):
        return True
    if ident in ch.handled:
        return True
    ranges = ch.xranges.get(xid) if ch.xranges else None
    if ranges and any(first <= ident <= last for first, last, _ in ranges):
        return True
    return bool(ch.partial) and any(ident <= upto and target.visible(xid) for target, upto in ch.partial)


def fresh(ch, event, remember=True):
    """True (and remembered as handled) if *event* was not handled before."""
    ident = event.id
    xid = event.xid
    if ident is None or xid is None:
        return True       # a plain payload without log id: nothing to compare
    if seen(ch, ident, xid):
        return False
    if remember:
        ch.handled[ident] = xid
    return True


def fresh_list(ch, events, remember=True):
    """The events of *events* not handled before (``fresh`` for a whole page)."""
    return [event for event in events if fresh(ch, event, remember)]


def fresh_ids(ch, ids, xid, compact=True, after=None):
    """True if none of the rows *ids* of one statement (transaction *xid*, not
    visible in the position, ids increasing) was handled: they are then
    remembered as handled. False: some may have been (nothing remembered; the
    caller takes ``fresh_list`` of their events).

    Usually none was: that is checked with one set operation, and the statement
    is remembered as one (first, last, n) record of its transaction instead of n
    ids (a 200,000-row burst otherwise fills a dict of 200,000 ids until the
    position moves past it). *after*: the last id of the rows remembered just
    before these, of the same statement with none of its rows between (the
    chunk before): their record, if it is still the last, is extended, so a
    statement read in many chunks stays one record."""
    if ch.partial or not ids:
        return False
    if not ch.handled.keys().isdisjoint(ids):
        return False
    first, last = ids[0], ids[-1]
    ranges = ch.xranges.get(xid)
    if ranges and any(f <= last and first <= l for f, l, _ in ranges):
        return False
    if compact:
        if ranges is None:
            ch.xranges[xid] = [(first, last, len(ids))]
        elif after is not None and ranges[-1][1] == after:
            f, _, n = ranges[-1]
            ranges[-1] = (f, last, n + len(ids))
        else:
            ranges.append((first, last, len(ids)))
    else:
        ch.handled.update(dict.fromkeys(ids, xid))
    return True


def move(ch, snapshot):
    """The position moves to *snapshot*: what it now covers is forgotten."""
    ch.position = snapshot
    xmin, xmax, xip = snapshot.xmin, snapshot.xmax, snapshot.xip
    # keep the ids of transactions not visible in the new position (Snapshot.visible, inlined)
    ch.handled = {i: x for i, x in ch.handled.items() if x >= xmin and (x >= xmax or x in xip)}
    if ch.xranges:
        ch.xranges = {x: r for x, r in ch.xranges.items() if x >= xmin and (x >= xmax or x in xip)}
    ch.partial = [(t, u) for t, u in ch.partial if not snapshot.covers(t)]
    ch.catchup_target = None
    ch.catchup_upto = 0
