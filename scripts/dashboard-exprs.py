#!/usr/bin/env python3
"""Prints every PromQL expression of the Grafana dashboards, one JSON object a line.

    scripts/dashboard-exprs.py [DIR]     (default: grafana/dashboards beside this script)

Each line is {"dashboard": file name, "panel": panel title, "refId": ..., "expr": ...}
with Grafana's interval variables replaced by values Prometheus accepts
($__rate_interval -> 1m, $__interval -> 15s), so the expression can be sent as it is
to /api/v1/query. Panels nested in rows are included. Exits 1 if a dashboard holds no
expression at all, or uses a variable other than those two.
"""

import json
import re
import signal
import sys
from pathlib import Path

SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s"}
VARIABLE = re.compile(r"\$\{?\w+")


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions(dashboard):
    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                yield panel.get("title", ""), target.get("refId", ""), expr


def substitute(expr):
    # The longer name first: $__interval is a prefix of neither, but keep it explicit.
    for name in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(name, SUBSTITUTIONS[name])
    return expr


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` is not an error
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "grafana" / "dashboards"
    files = sorted(root.rglob("*.json"))
    if not files:
        sys.exit(f"no dashboard JSON under {root}")
    status = 0
    for path in files:
        dashboard = json.loads(path.read_text())
        found = 0
        for title, ref_id, expr in expressions(dashboard):
            found += 1
            query = substitute(expr)
            leftover = VARIABLE.findall(query)
            if leftover:
                print(f"{path.name}: panel {title!r} uses {leftover}", file=sys.stderr)
                status = 1
            print(json.dumps({"dashboard": path.name, "panel": title, "refId": ref_id, "expr": query}))
        if not found:
            print(f"{path.name}: no expression", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
