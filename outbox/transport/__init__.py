"""Broker transports: ``base`` (the protocol), ``kafka`` and ``memory``."""
