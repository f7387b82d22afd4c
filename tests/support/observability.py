"""What the observability tests share: the alert rules and the dashboard shipped in
``deploy/``, the metric names their expressions use, and a consumer handler that makes every
consumer metric appear (``tests.support.observability:every_outcome``)."""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from outbox import DownstreamUnavailable, PoisonMessage
from outbox.consumer import json_value
from outbox.transport.base import IncomingMessage
from tests.support.cli import ROOT

RULES = ROOT / "deploy" / "prometheus" / "outbox-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "outbox-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-dashboard.json"

#: A metric name of ours in a PromQL expression (a histogram's as ``..._bucket``).
METRIC = re.compile(r"\boutbox_[a-z_]+")


def rules(path: Path = RULES) -> list[dict[str, Any]]:
    """Every rule of the rule file (PyYAML: the docs extra brings it)."""
    import pytest

    yaml: Any = pytest.importorskip("yaml", reason="PyYAML reads the alert rules")
    loaded = yaml.safe_load(path.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def dashboard_queries(node: Any) -> Iterator[str]:
    """Every PromQL string of a dashboard: panel targets' ``expr``, variables' queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def metric_names(expressions: Iterator[str] | list[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC.findall(expr)}


# -- a handler with every outcome ---------------------------------------------------------------

_attempts: collections.Counter[str] = collections.Counter()


def every_outcome(session: Session, message: IncomingMessage) -> None:
    """``{"n": 0}`` is poison (dead-lettered at once); ``{"n": 1}``'s dependency is down at its
    first attempt (a transient failure), ``{"n": 2}`` fails its first attempt (a retry); the
    others, and those on their second attempt, are processed (no effect written)."""
    n = int(json_value(message)["n"])
    key = (message.header("message-id") or b"").decode()
    _attempts[key] += 1
    if n == 0:
        raise PoisonMessage("the test's poison message")
    if n == 1 and _attempts[key] == 1:
        raise DownstreamUnavailable("the test's dependency is down once")
    if n == 2 and _attempts[key] == 1:
        raise TimeoutError("the test's handler fails once")
