"""Helpers shared by the tests — the only place they live: a test module never imports from
another test module. A real Kafka-protocol broker and its readers, the commands run as users
run them (:mod:`.cli`), the one polling wait (:mod:`.waits`), consumer handlers, entities."""
