"""Kafka for kotel: the local broker (`kotel kafka ...`, :mod:`kotel.kafka.broker`) and client helpers."""
