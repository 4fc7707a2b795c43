"""Consumer groups across processes: real member processes (subprocesses running the
library) whose handler records each event it handled in a table, and real faults
(SIGKILL, SIGSTOP, SIGTERM). Plus ``ordering="row"`` in one process."""

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

from pgnotify_sync import ConfigError, install, watch_table
from pgnotify_sync._group import deal
from pgnotify_sync.status import consumer_groups

from helpers import wait_for
from pgutil import Collector, execute

from test_consumers import ChildLines

GROUP = "indexer"
LEASE_S = 3.0

MEMBER = """
import json, logging, os, signal, sys, threading, time
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.INFO, format="%(asctime)s " + json.loads({args!r})["name"] + " %(message)s")
import psycopg2
from pgnotify_sync import Config, Listener
args = json.loads({args!r})
cfg = Config(**args["cfg"])
record = psycopg2.connect(**args["dsn"])
record.autocommit = True
lock = threading.Lock()
listener = Listener(cfg, consumer={group!r}, name=args["name"], checkpoint_every=args["checkpoint_every"],
                    registry=False)

@listener.on_event("jobs")
def handle(event):
    time.sleep(args["delay_s"])
    with lock, record.cursor() as cur:
        cur.execute("INSERT INTO handled (member, event_id, row_id, at) VALUES (%s, %s, %s, clock_timestamp())",
                    (args["name"], event.id, event.data["id"]))

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
listener.start()
print("ready", flush=True)
stop.wait(300)
listener.stop(timeout=10)
print("stopped", flush=True)
"""


@pytest.fixture
def jobs(db):
    install(db)
    execute(db, "CREATE TABLE jobs (id serial PRIMARY KEY, n int)")
    execute(db, "CREATE TABLE handled (member text, event_id bigint, row_id int, at timestamptz)")
    watch_table(db, "public.jobs", channel="jobs")
    return db


class Members:
    """Member processes of group GROUP; every one is killed at teardown."""

    def __init__(self, dsn):
        self.dsn = dsn
        self.procs = {}

    def start(self, name, partitions, delay_s=0.002, checkpoint_every=10, **cfg):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        dsn = {k: self.dsn[k] for k in ("host", "port", "user", "password", "dbname")}
        config = dict(postgres_host=dsn["host"], postgres_port=dsn["port"], postgres_user=dsn["user"],
                      postgres_password=dsn["password"], postgres_db=dsn["dbname"], channels=["jobs"],
                      consumer_partitions=partitions, consumer_lease_s=LEASE_S, health_check_interval_s=2.0,
                      **cfg)
        args = json.dumps({"cfg": config, "dsn": dsn, "name": name, "delay_s": delay_s,
                           "checkpoint_every": checkpoint_every})
        proc = subprocess.Popen([sys.executable, "-c", MEMBER.format(root=root, args=args, group=GROUP)],
                                stdout=subprocess.PIPE, text=True)
        out = ChildLines(proc)
        self.procs[name] = (proc, out)
        assert out.next() == "ready"
        return proc

    def signal(self, name, sig):
        self.procs[name][0].send_signal(sig)

    def wait_exit(self, name, timeout=20):
        proc, out = self.procs[name]
        return proc.wait(timeout)

    def kill_all(self):
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()


@pytest.fixture
def members(dsn):
    group = Members(dsn)
    yield group
    group.kill_all()


def insert(db, count, per_tx=50):
    with db.cursor() as cur:
        for start in range(0, count, per_tx):
            cur.execute("INSERT INTO jobs (n) SELECT g FROM generate_series(%s, %s) g",
                        (start, min(count, start + per_tx) - 1))


def handled(db):
    """{event id: [member, ...]} of every handling recorded."""
    seen = collections.defaultdict(list)
    for event_id, member in execute(db, "SELECT event_id, member FROM handled ORDER BY at"):
        seen[event_id].append(member)
    return seen


def log_ids(db):
    return {i for (i,) in execute(db, "SELECT id FROM pgnotify_sync.event_log WHERE channel = 'jobs'")}


def holders(db):
    """{member id: partitions held under a live lease}."""
    return dict(execute(db, "SELECT owner, count(*) FROM pgnotify_sync.consumers WHERE name = %s "
                            "AND owner IS NOT NULL AND lease_until > clock_timestamp() GROUP BY owner", (GROUP,)))


def settled(db, members, partitions):
    """True once *members* live members hold every partition, spread evenly."""
    held = holders(db)
    return (len(held) == members and sum(held.values()) == partitions
            and max(held.values()) - min(held.values()) <= 1)


def two_members_at_work(db, members, partitions, delay_s, rows, started):
    """Members m1 and m2 hold the *partitions* evenly, *rows* are written, and m1
    handled at least *started* of them."""
    members.start("m1", partitions=partitions, delay_s=delay_s)
    members.start("m2", partitions=partitions, delay_s=delay_s)
    wait_for(lambda: settled(db, 2, partitions), timeout=20, message="partitions not spread")
    insert(db, rows)
    wait_for(lambda: sum(1 for m in handled(db).values() if "m1" in m) >= started, timeout=30,
             message="m1 handled nothing")


def wait_all_handled(db, timeout=60):
    ids = log_ids(db)
    wait_for(lambda: ids <= set(handled(db)), timeout=timeout,
             message=f"not every event of the log was handled ({len(ids)} in the log)")
    return ids


# -- the deal (no database) ---------------------------------------------------------------


def test_deal_spreads_every_slot_once_and_evenly():
    members = [("a", {"jobs", "x"}), ("b", {"jobs", "x"}), ("c", {"jobs", "x"})]
    shares = [deal(members, 4, m) for m, _ in members]
    slots = [slot for share in shares for slot in share]
    assert sorted(slots) == sorted((w, p) for w in ("jobs", "x") for p in range(4))
    assert sorted(len(s) for s in shares) == [2, 3, 3]


@pytest.mark.parametrize("partitions", [1, 2, 3, 5])
def test_deal_gives_every_slot_to_one_member_when_channel_sets_differ(partitions):
    members = [("a", {"x", "y"}), ("b", {"y"}), ("c", {"y", "z"})]
    shares = {m: deal(members, partitions, m) for m, _ in members}
    slots = [slot for share in shares.values() for slot in share]
    assert sorted(slots) == sorted((w, p) for w in ("x", "y", "z") for p in range(partitions))
    channels = dict(members)
    assert all(wire in channels[m] for m, share in shares.items() for wire, _ in share)


# -- real member processes ----------------------------------------------------------------


def test_three_members_share_the_events_exactly_once(jobs, members):
    for name in ("m1", "m2", "m3"):
        members.start(name, partitions=6)
    wait_for(lambda: settled(jobs, 3, 6), timeout=20, message="partitions not spread")
    with jobs.cursor() as cur:
        (group,) = consumer_groups(cur)
    assert group["partitions"] == 6 and len(group["members"]) == 3
    assert sorted(p["partition"] for p in group["positions"]) == list(range(6))
    assert {p["owner"] for p in group["positions"]} == {m["member"] for m in group["members"]}
    insert(jobs, 1200)
    ids = wait_all_handled(jobs)
    seen = handled(jobs)
    assert len(ids) == 1200
    repeated = {i: m for i, m in seen.items() if len(m) > 1}
    assert repeated == {}, f"{len(repeated)} events handled more than once"
    workers = collections.Counter(m[0] for m in seen.values())
    assert len(workers) >= 2, workers


def test_sigkill_of_a_member_loses_nothing_and_repeats_a_bounded_few(jobs, members):
    two_members_at_work(jobs, members, partitions=4, delay_s=0.005, rows=800, started=100)
    members.signal("m1", signal.SIGKILL)
    killed_at = time.monotonic()
    members.wait_exit("m1")
    wait_for(lambda: settled(jobs, 1, 4), timeout=LEASE_S + 5, message="m2 did not take over")
    assert time.monotonic() - killed_at <= LEASE_S + 5
    ids = wait_all_handled(jobs)
    seen = handled(jobs)
    assert len(ids) == 800
    repeats = sum(len(m) - 1 for m in seen.values())
    # m1 held 2 partitions: each repeats at most checkpoint_every (10) plus its event in flight
    assert repeats <= 2 * (10 + 1), repeats


def test_sigterm_of_a_member_hands_over_without_any_repeat(jobs, members):
    two_members_at_work(jobs, members, partitions=4, delay_s=0.003, rows=600, started=50)
    members.signal("m1", signal.SIGTERM)
    assert members.wait_exit("m1") == 0
    wait_for(lambda: settled(jobs, 1, 4), timeout=10, message="m2 did not take over at once")
    insert(jobs, 100)
    ids = wait_all_handled(jobs)
    seen = handled(jobs)
    assert len(ids) == 700
    assert {i: m for i, m in seen.items() if len(m) > 1} == {}


def test_a_member_joining_takes_a_share_without_any_repeat(jobs, members):
    members.start("m1", partitions=4, delay_s=0.003)
    wait_for(lambda: settled(jobs, 1, 4), timeout=20, message="m1 holds not all")
    insert(jobs, 400)
    wait_for(lambda: len(handled(jobs)) >= 50, timeout=30, message="m1 handled nothing")
    members.start("m2", partitions=4, delay_s=0.003)
    wait_for(lambda: settled(jobs, 2, 4), timeout=20, message="m2 took no share")
    insert(jobs, 400)
    ids = wait_all_handled(jobs)
    seen = handled(jobs)
    assert len(ids) == 800
    assert {i: m for i, m in seen.items() if len(m) > 1} == {}
    assert any(m == ["m2"] for m in seen.values()), "m2 handled nothing"


def test_a_frozen_member_is_fenced_and_its_partitions_taken_over(jobs, members):
    two_members_at_work(jobs, members, partitions=2, delay_s=0.005, rows=300, started=20)
    members.signal("m1", signal.SIGSTOP)
    frozen_at = time.monotonic()
    wait_for(lambda: settled(jobs, 1, 2), timeout=LEASE_S + 5, message="m2 did not take over")
    taken_at = time.monotonic()
    insert(jobs, 300)
    members.signal("m1", signal.SIGCONT)
    ids = wait_all_handled(jobs)
    assert len(ids) == 600
    # After it woke up m1 handled nothing m2 had (its lease was gone: fenced): no event
    # of the second batch twice. (m1 may take a share of it back once it rejoined and
    # m2 handed one over: that is a clean hand-over, no repeat.)
    twice = execute(jobs, "SELECT count(*) FROM (SELECT event_id FROM handled WHERE event_id > %s "
                          "GROUP BY event_id HAVING count(*) > 1) d", (max(ids) - 300,))[0][0]
    assert twice == 0
    assert taken_at - frozen_at <= LEASE_S + 5
    wait_for(lambda: settled(jobs, 2, 2), timeout=20, message="m1 did not rejoin")
    insert(jobs, 100)
    ids = wait_all_handled(jobs)
    repeats = sum(len(m) - 1 for m in handled(jobs).values())
    assert repeats <= 10 + 1 + 1, repeats     # one partition's checkpoint_every, plus in flight


# -- in one process -----------------------------------------------------------------------


def test_members_with_another_partition_count_are_refused(jobs, make_listener):
    first = make_listener(channels=("jobs",), consumer=GROUP, consumer_partitions=4)
    first.start()
    other = make_listener(channels=("jobs",), consumer=GROUP, consumer_partitions=2)
    with pytest.raises(ConfigError) as info:
        other.start(timeout_s=10)
    assert "consumer group 'indexer' has 4 partitions and this listener has 2" in str(info.value)


def test_a_lone_member_holds_everything_when_start_returns(jobs, make_listener):
    listener = make_listener(channels=("jobs",), consumer=GROUP, consumer_partitions=3)
    got = Collector()
    listener.on_event("jobs", got)
    listener.start()
    consumer = listener.health()["consumer"]
    assert consumer["owned"] == ["jobs/0", "jobs/1", "jobs/2"] and consumer["members"] == 1
    insert(jobs, 30)
    assert len(got.wait(30)) == 30
    listener.stop()
    assert holders(jobs) == {}, "a stopped member keeps no lease"
    assert execute(jobs, "SELECT count(*) FROM pgnotify_sync.consumer_members")[0][0] == 0


def test_a_member_holding_several_partitions_reads_each_row_once(jobs, make_listener):
    listener = make_listener(channels=("jobs",), consumer=GROUP, consumer_partitions=4)
    got = Collector()
    listener.on_event("jobs", got)
    listener.start()
    log = listener._connections.event_log
    asked = []
    read = log.events_by_id

    def counting(channel, wire, ids):
        asked.append(len(ids))
        return read(channel, wire, ids)
    log.events_by_id = counting
    for n in range(200):
        execute(jobs, "INSERT INTO jobs (n) VALUES (%s)", (n,))
    assert len(got.wait(200)) == 200
    # 4 lanes get every hint; without shared reads they would ask for 800 ids
    assert sum(asked) <= 300, sum(asked)
    assert sorted(e.data["n"] for e in got.events) == list(range(200))


def test_a_standby_member_takes_over_when_the_holder_stops(jobs, make_listener):
    from prometheus_client import CollectorRegistry
    holder = make_listener(channels=("jobs",), consumer=GROUP, consumer_lease_s=LEASE_S)
    got_holder, got_standby = Collector(), Collector()
    holder.on_event("jobs", got_holder)
    holder.start()
    registry = CollectorRegistry()
    standby = make_listener(channels=("jobs",), consumer=GROUP, consumer_lease_s=LEASE_S, registry=registry)
    connected = []
    standby.signals.connected.connect(lambda sender, **kw: connected.append(1), weak=False)
    standby.on_event("jobs", got_standby)
    standby.start()
    assert standby.health()["consumer"]["owned"] == [] and connected == [1]
    assert registry.get_sample_value("pgnotify_sync_consumer_partitions_owned",
                                     {"listener": standby.name, "consumer": GROUP}) == 0
    insert(jobs, 10)
    got_holder.wait(10)
    holder.stop()
    insert(jobs, 10)
    got_standby.wait(10, timeout=LEASE_S + 10)
    assert standby.health()["consumer"]["owned"] == ["jobs/0"]
    assert registry.get_sample_value("pgnotify_sync_consumer_partitions_owned",
                                     {"listener": standby.name, "consumer": GROUP}) == 1
    assert registry.get_sample_value("pgnotify_sync_consumer_rebalances_total",
                                     {"listener": standby.name, "consumer": GROUP}) >= 1
    ids = [e.id for e in got_holder.events] + [e.id for e in got_standby.events]
    assert sorted(ids) == sorted(log_ids(jobs)) and len(set(ids)) == 20, "each event once, none lost"


def test_a_consumer_of_one_partition_grows_to_more_from_its_position(jobs, make_listener):
    first = make_listener(channels=("jobs",), consumer=GROUP)
    got = Collector()
    first.on_event("jobs", got)
    first.start()
    insert(jobs, 5)
    got.wait(5)
    first.stop()
    # as an earlier version left it: one position row, no group
    execute(jobs, "DELETE FROM pgnotify_sync.consumer_groups")
    insert(jobs, 40)                    # while nobody runs
    grown = make_listener(channels=("jobs",), consumer=GROUP, consumer_partitions=4)
    got4 = Collector()
    grown.on_event("jobs", got4)
    grown.start()
    events = got4.wait(40)
    assert sorted(e.data["n"] for e in events) == list(range(40)) and len(got4) == 40
    assert execute(jobs, "SELECT count(*) FROM pgnotify_sync.consumers WHERE name = %s", (GROUP,))[0][0] == 4


def test_ordering_by_row_in_a_group_member_keeps_each_rows_order(jobs, make_listener):
    listener = make_listener(channels=("jobs",), consumer=GROUP, consumer_partitions=2, ordering="row",
                             worker_pool_size=4)
    by_row = collections.defaultdict(list)
    lock = threading.Lock()

    def handle(event):
        time.sleep(0.005)
        with lock:
            by_row[event.data["id"]].append(event.data["n"])
    listener.on_event("jobs", handle)
    listener.start()
    execute(jobs, "INSERT INTO jobs (n) SELECT 0 FROM generate_series(1, 12)")
    for n in range(1, 4):
        execute(jobs, "UPDATE jobs SET n = %s", (n,))
    wait_for(lambda: sum(map(len, list(by_row.values()))) >= 48, timeout=30, message="not every event came")
    assert dict(by_row) == {row: [0, 1, 2, 3] for row in range(1, 13)}


def test_ordering_by_row_keeps_each_rows_order_and_runs_rows_in_parallel(jobs, make_listener):
    listener = make_listener(channels=("jobs",), ordering="row", worker_pool_size=4)
    running = 0
    most = 0
    lock = threading.Lock()
    by_row = collections.defaultdict(list)

    def handle(event):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
            by_row[event.data["id"]].append(event.data["n"])

    listener.on_event("jobs", handle)
    listener.start()
    execute(jobs, "INSERT INTO jobs (n) SELECT 0 FROM generate_series(1, 8)")
    for n in range(1, 6):
        execute(jobs, "UPDATE jobs SET n = %s", (n,))
    wait_for(lambda: sum(map(len, list(by_row.values()))) >= 48, timeout=30,
             message="not all 48 events came")
    assert {row: ns for row, ns in by_row.items()} == {row: [0, 1, 2, 3, 4, 5] for row in range(1, 9)}
    assert most >= 2, "handlers of one channel never overlapped"


def test_a_member_silent_past_its_own_lease_is_left_out_whatever_the_others_lease(jobs, make_listener):
    """A dead member with a 2 s lease, whose id sorts first: a member with a 10 s lease
    must not wait 10 s (its own lease) to count it out, nor deal it the partition."""
    first = make_listener(channels=("jobs",), consumer=GROUP)
    first.start()
    first.stop()
    execute(jobs, "INSERT INTO pgnotify_sync.consumer_members (name, member, host, pid, channels, lease_s, heartbeat_at) "
                  "VALUES (%s, '0000-dead', 'gone', 1, '{jobs}', 2, clock_timestamp() - interval '3 s')", (GROUP,))
    execute(jobs, "UPDATE pgnotify_sync.consumers SET owner = '0000-dead', lease_until = clock_timestamp() - "
                  "interval '1 s' WHERE name = %s", (GROUP,))
    second = make_listener(channels=("jobs",), consumer=GROUP, consumer_lease_s=10.0)
    got = Collector()
    second.on_event("jobs", got)
    second.start()
    assert second.health()["consumer"]["owned"] == ["jobs/0"], "the dead member was dealt the partition"
    insert(jobs, 3)
    assert len(got.wait(3)) == 3
