"""librdkafka's own log lines: the expected experimental-setting warning is dropped, and
repeated lines of one facility are throttled (a down broker logs many a second)."""

from __future__ import annotations

import logging

from outbox.transport.kafka import _LibrdkafkaFilter


def record(text: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("outbox.transport.librdkafka", level, "", 0, text, None, None)


def test_gapless_experimental_warning_is_dropped() -> None:
    f = _LibrdkafkaFilter()
    assert not f.filter(record("CONFWARN [p] enable.gapless.guarantee is experimental: ..."))


def test_repeated_lines_of_a_facility_are_throttled() -> None:
    f = _LibrdkafkaFilter(interval=60)
    lines = [
        record(f"FAIL [thrd:127.0.0.1:9092] Connection refused (after {i}ms)") for i in range(50)
    ]
    assert sum(f.filter(r) for r in lines) == 1
    assert f.filter(record("REQTMOUT [thrd] timed out"))  # another facility still passes
    assert f.filter(record("FAIL [thrd] refused", logging.WARNING))  # another level too
