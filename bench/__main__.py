"""``python -m bench``: every figure of the performance issue, each with its raw
baseline measured in the same run, on a throwaway PostgreSQL cluster.

Figures (``--only NAME[,NAME]``; details in bench/figures.py):

writer_bulk    rows/s of 1000-row INSERT ... SELECT statements: our capture
               (statement mode, the default) vs the product spec's plain row
               trigger; our mode="row" for information.                 >= 1.0x
writer_single  single-row autocommit INSERTs/s, ours vs plain.            >= 0.8x
concurrent     commits/s of 16 pgbench clients (single-row INSERTs, fsync on, a
               cluster of its own): no trigger, plain (a raw loop drains it),
               ours, ours notify=False; our Listener delivers every row.
                                     notify=False >= 2.0x, default >= 1.0x
delivery       events/s of a 200,000-row burst committed in ONE transaction,
               COMMIT returning -> last handler call: Listener (1 worker) vs the
               raw select/poll/json.loads loop on the plain trigger.    >= 0.8x
drain          events/s of ONE statement of 100,000 rows in one transaction, the
               Listener with its default buffer (80,000), and with 10,000 for
               information: read as a range, in slices read ahead, vs the raw
               loop (and pg-listen with --peers).          >= 1.0x pg-listen
delivery_ssh   (--ssh) the same through SSH tunnels to a throwaway sshd: Listener
               (ssh_host=...) vs the raw loop through an sshtunnel forwarder;
               Listener tunnel vs direct for information.               >= 0.8x
latency        commit -> handler latency p50/p99 at 1,000 single-row commits/s
               (client clocks: perf_counter after the INSERT returned, and in the
               handler), ours vs raw.                          p99 <= raw + 1 ms
               Also vs raw_read: a bare loop on our hints that reads each row by
               id from the log (what the untrusted wire asks of any receiver).
load           delivered events/s and p99 latency at offered loads 500..8000/s,
               ours and raw; the PNG (--plot).
catchup        a durable consumer 100,000 events behind: start -> all delivered
               (no raw baseline: plain NOTIFY loses what nobody listens to).
                                                                  >= 50,000/s
memory         peak VmRSS growth of the Listener's process during a 1,000,000-
               event burst with a slow handler vs a 10x smaller burst: flat or
               not, with event_buffer_size 200 and 100,000 beside each other
               (and what each held: health()["queue_size"]).
faults         freeze -> disconnected (vs interval + timeout), stop() in a 10 s
               backoff, a wrong password refused (vs a good start); bench/faults.py.
groups         events/s with a 20 ms handler: a consumer group of 2 and 4 member
               processes vs 1 (4 partitions, 1 worker each), and ordering="row"
               vs "channel" (4 workers); bench/groups.py.                 info

Figures are medians over ``--runs`` (min - max in brackets); kinds alternate run
by run. The machine is shared and noisy: compare ours with its baseline of the
same invocation, never across invocations. Nothing here asserts speed; the exit
status is 0 whether targets are met or not (1: the bench itself failed).

Usage::

    python -m bench --quick                     # smoke: small sizes, 1 run, < 60 s
    python -m bench --runs 3 --ssh --json bench/results/full.json
    python -m bench --only delivery,latency --runs 5
"""

import argparse
import datetime
import json
import logging
import pathlib
import sys
import time

import attrs

if __package__ in (None, ""):  # run as a file: python bench/__main__.py
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import _plot, figures
from bench._common import BenchError, bench_target, machine_info, print_machine, print_table
from pgnotify_sync import PgNotifyError
from pgnotify_sync.testing import ClusterError

DEFAULT_PLOT = pathlib.Path(__file__).resolve().parent / "results" / "load.png"
ORDER = ("writer_bulk", "writer_single", "concurrent", "delivery", "drain", "delivery_ssh", "latency", "load",
         "catchup", "memory", "faults", "groups")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="pgnotify_sync figures, each against its raw baseline in the same run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="figures: " + ", ".join(ORDER))
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run: a smoke test (< 60 s)")
    parser.add_argument("--runs", type=int, default=None, help="runs of every kind (default 3; 1 with --quick)")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]", help="run only these figures")
    parser.add_argument("--ssh", action="store_true", help="add the SSH-tunnel figure (starts a throwaway sshd)")
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), metavar="PATH",
                        help="load-curve PNG (default bench/results/load.png; 'none': no plot)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every measured value as JSON")
    parser.add_argument("--peers", action="store_true",
                        help="pg-listen beside the raw loop in delivery and drain (npm installs pg-listen@1.7.0 and "
                             "pg@8.11.3 into a cache folder; skipped with a message without node)")
    parser.add_argument("--writer", choices=("thread", "process"), default="thread",
                        help="the paced writer of latency/load: threads of this process (default; they share the "
                             "GIL with the receivers, as in an app that writes and listens) or a child process")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in figures.FIGURES]
        if unknown:
            parser.error(f"--only: unknown figure(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
        if "delivery_ssh" in names:
            args.ssh = True
    else:
        names = [n for n in ORDER if n != "delivery_ssh" or args.ssh]
    args.names = [n for n in ORDER if n in names]
    if args.plot.lower() == "none":
        args.plot = None
    return args


def _machine_dict(info, args):
    d = dict(info)
    d["runs"] = args.runs
    return d


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.plot and "load" in args.names:
        missing = _plot.matplotlib_missing()
        if missing:
            print(missing, file=sys.stderr)
            return 2
    sizes = figures.QUICK if args.quick else figures.FULL
    began = time.monotonic()
    print("pgnotify_sync bench: every figure against its raw baseline, same run", flush=True)
    results = {}
    lines = []
    try:
        with bench_target() as target:
            admin = target.connect(application_name="pgnotify-bench-admin")
            try:
                info = machine_info(admin)
                print_machine(info, extra=[
                    ("target", target.description),
                    ("mode", f"{'quick' if args.quick else 'full'}, {args.runs} run(s) of every kind, alternating"),
                    ("paced writer", f"{args.writer} (latency, load)"),
                    ("figures", ", ".join(args.names)),
                ])
                print(flush=True)
                machine = _machine_dict(info, args)
                peers = args.peers
                if peers:
                    from bench import peers as peer_libs
                    why = peer_libs.unavailable()
                    if why:
                        print(why, flush=True)
                        peers = False
                    else:
                        peer_libs.install()
                ctx = figures.Ctx(target=target, admin=admin, sizes=sizes, runs=args.runs, writer=args.writer,
                                  peers=peers, log=lambda text: print(text, flush=True))
                figures.prepare(ctx)
                ssh_cm = None
                if args.ssh and "delivery_ssh" in args.names:
                    from bench._sshd import ssh_server
                    ssh_cm = ssh_server()
                    ctx.ssh = ssh_cm.__enter__()
                try:
                    for name in args.names:
                        started = time.monotonic()
                        print(f"{name} ...", flush=True)
                        figure_lines, raw = figures.FIGURES[name](ctx)
                        raw["seconds"] = round(time.monotonic() - started, 1)
                        results[name] = raw
                        lines.extend(figure_lines)
                        print(f"  ({raw['seconds']:.0f} s)", flush=True)
                finally:
                    if ssh_cm is not None:
                        ssh_cm.__exit__(None, None, None)
            finally:
                admin.close()
    except (BenchError, ClusterError, PgNotifyError) as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    total = time.monotonic() - began
    print()
    print_table(["figure", "ours (median, min - max)", "baseline (median, min - max)", "ratio", "target", "met?"],
                [figures.summary_row(line) for line in lines])
    for line in lines:
        if line.footnote:
            print(f"note: {line.footnote}")
    if "load" in results:
        print()
        print(f"load curve ({sizes.load_s} s of paced single-row commits per point; medians over {args.runs} run(s)):")
        headers, rows = figures.load_table(results["load"])
        print_table(headers, rows)
    print()
    print(f"machine: nproc {machine['nproc']}; {machine['date']}; total {total:.0f} s")

    if args.plot and "load" in results:
        path = pathlib.Path(args.plot)
        path.parent.mkdir(parents=True, exist_ok=True)
        _plot.plot_load(results["load"], machine, path)
        print(f"plot: {path}")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "machine": machine, "args": {k: v for k, v in vars(args).items()},
            "sizes": attrs.asdict(sizes),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "total_s": round(total, 1),
            "table": [figures.summary_row(line) for line in lines],
            "figures": results,
        }
        path.write_text(json.dumps(document, indent=1, default=str) + "\n")
        print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
