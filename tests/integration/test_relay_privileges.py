"""The relay checks its role's privileges at start, before sending anything: a role without
UPDATE used to send a batch, fail at the first failure record, and re-send it at every
restart."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from outbox import ConfigurationError, Relay, RelayConfig
from outbox.transport.memory import MemoryTransport
from tests.support.relay import FAST, publish


@pytest.fixture
def limited_role(engine: sa.Engine) -> Iterator[str]:
    """A login role with SELECT and DELETE on the outbox table, but not UPDATE."""
    role = f"relay_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(sa.text(f"GRANT SELECT, DELETE ON outbox_messages TO {role}"))
        conn.execute(sa.text(f"GRANT SELECT, UPDATE ON outbox_messages_leader TO {role}"))
    yield role
    with engine.begin() as conn:
        conn.execute(sa.text(f"REVOKE ALL ON outbox_messages FROM {role}"))
        conn.execute(sa.text(f"REVOKE ALL ON outbox_messages_leader FROM {role}"))
        conn.execute(sa.text(f"DROP ROLE {role}"))


def as_role(db_url: str, role: str) -> str:
    url = sa.make_url(db_url).set(username=role)
    return url.render_as_string(hide_password=False)


def test_a_missing_privilege_is_named_before_anything_is_sent(
    engine: sa.Engine, db_url: str, limited_role: str
) -> None:
    publish(engine, [("k", "v1"), ("k", "v2")])
    transport = MemoryTransport()
    relay = Relay(RelayConfig(db_url=as_role(db_url, limited_role), **FAST), lambda: transport)
    with pytest.raises(ConfigurationError, match=f"{limited_role}.*lacks UPDATE") as info:
        relay.run_once()
    assert "GRANT SELECT, UPDATE, DELETE ON outbox_messages" in str(info.value)
    assert transport.sent == []
    with pytest.raises(ConfigurationError, match="lacks UPDATE"):
        relay.check()


def test_retaining_sent_rows_needs_no_delete(
    engine: sa.Engine, db_url: str, limited_role: str
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"REVOKE DELETE ON outbox_messages FROM {limited_role}"))
        conn.execute(sa.text(f"GRANT UPDATE ON outbox_messages TO {limited_role}"))
    publish(engine, [("k", "v1")])
    transport = MemoryTransport()
    config = RelayConfig(db_url=as_role(db_url, limited_role), retain_sent=True, **FAST)
    assert Relay(config, lambda: transport).run_once().sent == 1


def test_the_leader_table_privileges_are_checked_too(
    engine: sa.Engine, db_url: str, limited_role: str
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"GRANT UPDATE ON outbox_messages TO {limited_role}"))
        conn.execute(sa.text(f"REVOKE UPDATE ON outbox_messages_leader FROM {limited_role}"))
    relay = Relay(RelayConfig(db_url=as_role(db_url, limited_role), **FAST), MemoryTransport)
    with pytest.raises(ConfigurationError, match="lacks UPDATE on outbox_messages_leader") as info:
        relay.check()
    assert f"GRANT SELECT, UPDATE ON outbox_messages_leader TO {limited_role}" in str(info.value)


def test_purging_sent_rows_needs_delete(engine: sa.Engine, db_url: str, limited_role: str) -> None:
    """``--retain-sent --purge-sent-after`` deletes: without DELETE the relay says so at
    start, as it does for the marks."""
    with engine.begin() as conn:
        conn.execute(sa.text(f"REVOKE DELETE ON outbox_messages FROM {limited_role}"))
        conn.execute(sa.text(f"GRANT UPDATE ON outbox_messages TO {limited_role}"))
    config = RelayConfig(
        db_url=as_role(db_url, limited_role), retain_sent=True, purge_sent_after=86400, **FAST
    )
    with pytest.raises(ConfigurationError, match="lacks DELETE") as info:
        Relay(config, MemoryTransport).check()
    assert "GRANT SELECT, UPDATE, DELETE ON outbox_messages" in str(info.value)
