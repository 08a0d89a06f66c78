"""kotel: a Kafka-native OpenTelemetry pipeline (shared core)."""

__version__ = "0.1.0"
