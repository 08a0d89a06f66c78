"""Stream stages: a pure core over OTLP, unit-tested alone, and a thin Faust ``bind(app, topology)``."""
