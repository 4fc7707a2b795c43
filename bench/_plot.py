"""The load-curve PNG: delivered events/s and p99 latency against the offered load,
ours beside the raw loop, medians with min-max bars. Needs matplotlib
(``pip install -r bench/requirements.txt``)."""

import importlib
import statistics

MISSING = ("matplotlib is not installed: the load-curve plot needs it.\n"
           "  install the bench's requirements:  pip install -r bench/requirements.txt\n"
           "  or run without the plot:           python -m bench --plot none")


def matplotlib_missing():
    """None if matplotlib can be imported, else the message to print."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return MISSING
    return None


def _series(points, kind, key, scale=1.0):
    xs, med, lo, hi = [], [], [], []
    for rate, runs in sorted(points.items(), key=lambda item: int(item[0])):
        values = [r[key] * scale for r in runs[kind]]
        xs.append(int(rate))
        m = statistics.median(values)
        med.append(m)
        lo.append(m - min(values))
        hi.append(max(values) - m)
    return xs, med, [lo, hi]


def plot_load(load_raw, machine, path):
    """Write the two-panel PNG to *path*."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    points = load_raw["points"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    styles = {"ours": dict(color="tab:blue", marker="o", label="Listener (ours)"),
              "raw": dict(color="tab:orange", marker="s", label="raw psycopg2 loop")}
    for kind, style in styles.items():
        xs, med, err = _series(points, kind, "delivered")
        left.errorbar(xs, med, yerr=err, capsize=3, **style)
        xs, med, err = _series(points, kind, "p99", 1000.0)
        right.errorbar(xs, med, yerr=err, capsize=3, **style)
    rates = sorted(int(r) for r in points)
    left.plot(rates, rates, color="grey", linestyle=":", label="offered")
    for kind, style in styles.items():
        xs, med, _err = _series(points, kind, "achieved")
        left.plot(xs, med, color=style["color"], linestyle="--", linewidth=1, alpha=0.7,
                  label=f"written/s while {style['label'].split(' (')[0]} listened")
    thousands = FuncFormatter(lambda v, _pos: f"{v:,.0f}")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(rates)
        ax.xaxis.set_major_formatter(thousands)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("offered load, single-row commits/s")
        ax.grid(True, alpha=0.3)
        ax.legend()
    left.set_yscale("log")
    left.set_yticks(rates)
    left.yaxis.set_major_formatter(thousands)
    left.yaxis.set_minor_formatter(NullFormatter())
    left.set_ylabel("delivered events/s")
    left.set_title("throughput")
    right.set_ylabel("commit -> handler latency p99, ms")
    right.set_title("p99 latency")
    fig.suptitle(f"pgnotify_sync load curve - nproc {machine['nproc']}, {machine['date']}\n"
                 f"PostgreSQL {machine['postgresql']}, Python {machine['python']}; "
                 f"medians of {machine['runs']} run(s), bars min-max, {load_raw['duration_s']} s per point, "
                 f"writer: {load_raw.get('writer', 'thread')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """``python -m bench._plot RESULTS.json OUT.png``: redraw the PNG from --json output."""
    import json
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench._plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    missing = matplotlib_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as f:
        document = json.load(f)
    plot_load(document["figures"]["load"], document["machine"], args[1])
    print(args[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
