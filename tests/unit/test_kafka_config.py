"""The producer settings the relay's guarantees rest on cannot be overridden."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from outbox import ConfigurationError
from outbox.transport.base import FailureKind
from outbox.transport.kafka import DEFAULTS, KafkaTransport, classify, producer_config, redact


def test_defaults_and_required_settings() -> None:
    conf = producer_config("b1:9092,b2:9092", {})
    assert conf["bootstrap.servers"] == "b1:9092,b2:9092"
    assert conf["enable.idempotence"] == "true"
    assert conf["acks"] == "all"
    for name, value in DEFAULTS.items():
        assert conf[name] == value
    assert conf["enable.gapless.guarantee"] == "true"


def test_overrides_are_kept() -> None:
    conf = producer_config(
        "b:9092",
        {"linger.ms": "50", "compression.type": "zstd", "security.protocol": "SASL_SSL"},
    )
    assert conf["linger.ms"] == "50"
    assert conf["compression.type"] == "zstd"
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["acks"] == "all" and conf["enable.idempotence"] == "true"


def test_bootstrap_servers_argument_wins_over_an_override() -> None:
    conf = producer_config("real:9092", {"bootstrap.servers": "other:9092"})
    assert conf["bootstrap.servers"] == "real:9092"


@pytest.mark.parametrize("acks", ["all", "ALL", "-1"])
def test_safe_acks_values_are_accepted(acks: str) -> None:
    assert producer_config("b:9092", {"acks": acks})["acks"] == "all"


@pytest.mark.parametrize("idem", ["true", "True", "TRUE"])
def test_idempotence_true_is_accepted(idem: str) -> None:
    assert producer_config("b:9092", {"enable.idempotence": idem})["enable.idempotence"] == "true"


@pytest.mark.parametrize(
    "override",
    [
        {"acks": "1"},
        {"acks": "0"},
        {"enable.idempotence": "false"},
        {"enable.idempotence": "False"},
        {"enable.idempotence": "0"},
    ],
    ids=repr,
)
def test_unsafe_overrides_are_refused(override: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="not allowed"):
        producer_config("b:9092", override)


@pytest.mark.parametrize("servers", ["", None])
def test_bootstrap_servers_are_required(servers: str | None) -> None:
    with pytest.raises(ConfigurationError, match="bootstrap"):
        producer_config(servers, {})  # type: ignore[arg-type]


def test_invalid_setting_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="invalid Kafka setting"):
        KafkaTransport("127.0.0.1:1", {"no.such.setting": "1"})


def test_redact_hides_secrets() -> None:
    shown = redact(
        {
            "sasl.password": "hunter2",
            "ssl.key.password": "k",
            "sasl.oauthbearer.client.secret": "s",
            "linger.ms": "5",
        }
    )
    assert shown == {
        "sasl.password": "***",
        "ssl.key.password": "***",
        "sasl.oauthbearer.client.secret": "***",
        "linger.ms": "5",
    }


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (KafkaError(KafkaError._MSG_TIMED_OUT), FailureKind.TRANSPORT),
        (KafkaError(KafkaError._ALL_BROKERS_DOWN), FailureKind.TRANSPORT),
        (KafkaError(KafkaError.NOT_ENOUGH_REPLICAS), FailureKind.TRANSPORT),
        (KafkaError(KafkaError._PURGE_QUEUE), FailureKind.TRANSPORT),
        (KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "x", retriable=True), FailureKind.TRANSPORT),
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), FailureKind.MESSAGE),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), FailureKind.MESSAGE),
        (KafkaError(KafkaError._FENCED, "fenced", fatal=True), FailureKind.FATAL),
        # The idempotent producer's state, not the message: re-create the client.
        (KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER), FailureKind.FATAL),
        (KafkaError(KafkaError._GAPLESS_GUARANTEE), FailureKind.FATAL),
    ],
    ids=lambda v: v.name() if isinstance(v, KafkaError) else v.name,
)
def test_classify(err: KafkaError, kind: FailureKind) -> None:
    failure = classify(err)
    assert failure.kind is kind
    assert err.name() in failure.reason


def test_a_refused_setting_does_not_echo_its_value() -> None:
    from outbox.transport.kafka import KafkaTransport

    with pytest.raises(ConfigurationError) as info:
        KafkaTransport("127.0.0.1:9", {"security.protocol": "hunter2-secret"})
    assert "hunter2" not in str(info.value) and "security.protocol" in str(info.value)
    assert info.value.__cause__ is None


def test_the_consumer_fetch_wait_is_chosen_not_librdkafka_s() -> None:
    """100 ms, not 500: the latency/broker-load trade-off of docs/performance.md. An -X
    override still wins (KafkaSource puts overrides after the defaults)."""
    from outbox.transport.kafka import CONSUMER_DEFAULTS

    assert CONSUMER_DEFAULTS["fetch.wait.max.ms"] == "100"
