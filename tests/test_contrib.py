"""The monitoring files in contrib/ (no database).

* contrib/prometheus/alerts.yml is checked by ``promtool check rules`` and unit-tested
  by ``promtool test rules contrib/prometheus/alerts_test.yml``. promtool is required:
  scripts/bootstrap.sh installs it (Debian package ``prometheus``); a missing promtool
  fails these tests, it never skips them.
* Every metric name used in an alert expression or a dashboard query must be one the
  library exports (``pgnotify_sync.metrics._LibraryCollector._families()``), so a
  renamed metric cannot leave a silent alert or an empty panel behind. This check is
  pure Python: the rules are read with PyYAML when it is importable, else with a small
  reader that understands the subset of YAML alerts.yml is written in.
* The Grafana dashboard's queries are also parsed by promtool (as recording rules, with
  the Grafana variables substituted).
"""

import json
import os
import re
import shutil
import subprocess

import pytest

from pgnotify_sync.metrics import _LibraryCollector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALERTS = os.path.join(ROOT, "contrib", "prometheus", "alerts.yml")
ALERTS_TEST = os.path.join(ROOT, "contrib", "prometheus", "alerts_test.yml")
DASHBOARD = os.path.join(ROOT, "contrib", "grafana", "pgnotify_sync.json")

#: Metrics of prometheus_client's ProcessCollector (collector_for adds it to private registries).
PROCESS_METRICS = {"process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
                   "process_cpu_seconds_total", "process_open_fds", "process_max_fds"}

MISSING_PROMTOOL = ("promtool not found on PATH: it validates contrib/prometheus/alerts.yml. "
                    "scripts/bootstrap.sh installs it when run as root (apt-get install "
                    "--no-install-recommends prometheus); or put any Prometheus release's promtool on PATH.")


# -- helpers -------------------------------------------------------------------------------

def library_metric_names():
    """Every sample name the library can expose, as {sample name: family name}."""
    names = {}
    for family in _LibraryCollector._families().values():
        if family.type == "counter":
            suffixes = ("_total",)
        elif family.type == "histogram":
            suffixes = ("_bucket", "_sum", "_count")
        else:
            suffixes = ("",)
        for suffix in suffixes:
            names[family.name + suffix] = family.name
    return names


_PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                    "bool", "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr):
    """The metric names a PromQL expression selects (a small lexer, enough for our queries:
    label matchers, ranges and grouping clauses are removed; what remains that is not
    a function call or a keyword is a metric name)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        if word.lower() in _PROMQL_KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def read_rules(path):
    """The alerting rules of a rules file as dicts (alert, expr, for, labels, annotations)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        import yaml
    except ImportError:
        return _read_rules_without_yaml(text)
    doc = yaml.safe_load(text)
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    # The fallback reader must agree with PyYAML wherever both are available.
    assert _read_rules_without_yaml(text) == rules
    return rules


def _scalar(lines, index, value, key_indent):
    """A YAML scalar starting on lines[index] after the key: plain or quoted on one line,
    or a ``|`` / ``>`` block (folded with ``>``; ``-`` chomps the final newline)."""
    value = value.strip()
    match = re.fullmatch(r"([|>])(-?)", value)
    if not match:
        if value[:1] in "\"'" and value[-1:] == value[:1]:
            value = json.loads(value) if value[0] == '"' else value[1:-1].replace("''", "'")
        return value, index + 1
    style, chomp = match.groups()
    block, index = [], index + 1
    while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > key_indent):
        block.append(lines[index])
        index += 1
    while block and not block[-1].strip():
        block.pop()
    width = min(_indent(line) for line in block if line.strip())
    block = [line[width:] for line in block]
    text = "\n".join(block) if style == "|" else " ".join(line.strip() for line in block)
    return text + ("" if chomp else "\n"), index


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def _read_rules_without_yaml(text):
    """Enough YAML for alerts.yml: ``- alert:`` items whose keys are scalars or one level of
    scalar mappings (labels, annotations). Comments are whole lines only."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    rules, rule, rule_indent, section = [], None, 0, None
    index = 0
    while index < len(lines):
        line = lines[index]
        indent = _indent(line)
        if rule is not None and line.strip() and indent < rule_indent:
            rule = section = None           # past the rule (the next group, ...)
        item = re.match(r"\s*- alert:\s*(.+)$", line)
        key = re.match(r"\s*([A-Za-z_]+):\s*(.*)$", line)
        if item:
            rule, rule_indent, section = {"alert": item.group(1).strip()}, indent + 2, None
            rules.append(rule)
            index += 1
            continue
        if rule is None or key is None:
            index += 1                      # blank, or outside a rule
            continue
        name, value = key.groups()
        if indent == rule_indent:
            if name in ("labels", "annotations") and not value.strip():
                section = rule.setdefault(name, {})
                index += 1
                continue
            section = None
            rule[name], index = _scalar(lines, index, value, indent)
        elif section is not None:
            section[name], index = _scalar(lines, index, value, indent)
        else:
            raise AssertionError(f"unexpected line in rules file: {line!r}")
    return rules


def run_promtool(*args):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(MISSING_PROMTOOL, pytrace=False)
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, (f"promtool {' '.join(args)} failed (exit {result.returncode}):\n"
                                    f"{result.stdout}\n{result.stderr}")
    return result.stdout


def dashboard_targets(dashboard):
    """(panel title, expr) for every query in the dashboard, rows' nested panels included."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", ()):
                if target.get("expr"):
                    found.append((panel.get("title"), target["expr"]))
            walk(panel.get("panels", ()))

    walk(dashboard["panels"])
    return found


def load_dashboard():
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def assert_known_metrics(where, expr, allowed):
    names = promql_metric_names(expr)
    assert names, f"{where}: no metric name found in {expr!r}"
    unknown = names - set(allowed)
    assert not unknown, (f"{where}: {sorted(unknown)} not exported by pgnotify_sync "
                         f"(known: {sorted(allowed)}) in {expr!r}")
    return names


# -- the helpers themselves ----------------------------------------------------------------

def test_promql_metric_names():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (listener, le) (rate(a_bucket{x=~"$l", y="b(c)"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert promql_metric_names("sum(rate(a_total[5m])) by (job) / ignoring(le) group_left() b > 1e3") == {
        "a_total", "b"}
    assert promql_metric_names("process_open_fds and on (job, instance) up offset 5m") == {
        "process_open_fds", "up"}


def test_library_metric_names():
    names = library_metric_names()
    assert "pgnotify_sync_events_delivered_total" in names
    assert "pgnotify_sync_events_delivered" not in names
    assert "pgnotify_sync_handler_duration_seconds_bucket" in names
    assert "pgnotify_sync_connection_state" in names


# -- Prometheus alerting rules --------------------------------------------------------------

def test_promtool_check_rules():
    out = run_promtool("check", "rules", ALERTS)
    assert "SUCCESS" in out


def test_promtool_rule_unit_tests():
    """alerts_test.yml: connection loss, FAILED, consumer gap, handler error rate, reconnect
    storm and buffer alerts fire on synthetic series (and a healthy listener stays quiet)."""
    out = run_promtool("test", "rules", ALERTS_TEST)
    assert "SUCCESS" in out
    with open(ALERTS_TEST, encoding="utf-8") as f:
        tested = set(re.findall(r"alertname:\s*(\w+)", f.read()))
    assert {"PgnotifySyncNotListening", "PgnotifySyncConnectionFailed", "PgnotifySyncConsumerGap"} <= tested


def test_alert_rules_are_complete_and_use_known_metrics():
    rules = read_rules(ALERTS)
    allowed = library_metric_names()
    assert len(rules) >= 12
    assert len({r["alert"] for r in rules}) == len(rules), "duplicate alert names"
    used = set()
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"PgnotifySync[A-Za-z]+", name), name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: needs `for`"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), f"{name}: severity"
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            assert "{{ $labels.listener }}" in annotations.get(key, ""), f"{name}: {key} must name the listener"
        used |= {allowed[n] for n in assert_known_metrics(name, rule["expr"], allowed)}
    by_name = {r["alert"]: r for r in rules}
    assert by_name["PgnotifySyncConsumerGap"]["labels"]["severity"] == "critical"
    assert by_name["PgnotifySyncConnectionFailed"]["labels"]["severity"] == "critical"
    for family in ("handler_errors", "events_delivered", "connection_state", "parse_errors", "overflow_events",
                   "queue_size", "queue_capacity", "lag_events", "reconnect_attempts", "health_check_failures",
                   "consumer_gap_events", "publish_buffer_size", "pool_connections_discarded"):
        assert f"pgnotify_sync_{family}" in used, f"no alert on pgnotify_sync_{family}"


def test_rules_reader_handles_the_yaml_used():
    text = (
        "groups:\n"
        "  - name: g\n"
        "    rules:\n"
        "      - alert: A\n"
        "        expr: |\n"
        "          sum(x)\n"
        "            > 1\n"
        "        for: 5m\n"
        "        labels:\n"
        "          severity: warning\n"
        "        annotations:\n"
        "          summary: \"on {{ $labels.listener }}\"\n"
        "          description: >-\n"
        "            one\n"
        "            two\n"
        "      - alert: B\n"
        "        expr: y == 0\n"
        "        for: 0m\n"
    )
    assert _read_rules_without_yaml(text) == [
        {"alert": "A", "expr": "sum(x)\n  > 1\n", "for": "5m", "labels": {"severity": "warning"},
         "annotations": {"summary": "on {{ $labels.listener }}", "description": "one two"}},
        {"alert": "B", "expr": "y == 0", "for": "0m"},
    ]


# -- Grafana dashboard --------------------------------------------------------------------

def test_dashboard_loads_and_has_variables():
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 40
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    listener = variables["listener"]
    assert listener["definition"] == "label_values(pgnotify_sync_connection_state, listener)"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_use_known_metrics_and_cover_every_family():
    dashboard = load_dashboard()
    allowed = dict(library_metric_names(), **{name: name for name in PROCESS_METRICS})
    used = set()
    targets = dashboard_targets(dashboard)
    assert len(targets) >= 20
    for title, expr in targets:
        names = assert_known_metrics(f"panel {title!r}", expr, allowed)
        used |= {allowed[n] for n in names}
        if any(n.startswith("pgnotify_sync_") for n in names):
            assert 'listener=~"$listener"' in expr, f"panel {title!r}: not filtered by $listener: {expr!r}"
    missing = set(_LibraryCollector._families()) - used
    assert not missing, f"metric families without a dashboard panel: {sorted(missing)}"
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert name in used, name


def test_dashboard_queries_parse(tmp_path):
    """promtool parses every dashboard query (as a recording rule; Grafana variables substituted)."""
    rules = []
    for i, (title, expr) in enumerate(dashboard_targets(load_dashboard())):
        expr = expr.replace("$__rate_interval", "5m").replace("$listener", ".*")
        assert "$" not in expr, f"panel {title!r}: unexpected variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))   # JSON is YAML
    out = run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in out


# -- docs/monitoring.md -------------------------------------------------------------------

def test_monitoring_doc_lists_every_metric_and_alert():
    with open(os.path.join(ROOT, "docs", "monitoring.md"), encoding="utf-8") as f:
        doc = f.read()
    for family in _LibraryCollector._families().values():
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{exposed}` |" in doc, f"docs/monitoring.md: no table row for {exposed}"
    for rule in read_rules(ALERTS):
        assert f"| `{rule['alert']}` |" in doc, f"docs/monitoring.md: alert {rule['alert']} not listed"
