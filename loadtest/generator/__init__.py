"""The load generator: OTLP traffic with production shapes, every item accounted for in a ledger."""

from loadtest.generator.driver import Driver, DriveStats, SignalStats
from loadtest.generator.ledger import Ledger
from loadtest.generator.shapes import Built, Shapes
from loadtest.generator.targets import GrpcTarget, HttpTarget, KafkaTarget, Target, make_target

__all__ = ["Built", "DriveStats", "Driver", "GrpcTarget", "HttpTarget", "KafkaTarget", "Ledger", "Shapes",
           "SignalStats", "Target", "make_target"]
