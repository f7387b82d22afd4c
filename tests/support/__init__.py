"""Test helpers: a real Kafka-protocol broker, Kafka readers, subprocess relays."""
