"""`kotel replay`: re-deliver a topic's (or a Parquet spill's / archive's) history to a topic or a sink.

The source is read by manual assignment (no group joined, nothing committed), its range is fixed when
the replay starts, and progress is checkpointed per partition after each acknowledged chunk, so an
interrupted replay resumes without skipping a record. Where a resumed replay may deliver a chunk twice,
the target absorbs it:

- a raw topic: the dedup stage drops the repeats (its window is 5 min by default; resume within it);
- any other topic: consumers see the chunk twice (at-least-once, like every kotel stage);
- Prometheus: the same sample with the same timestamp is accepted again without effect;
- Loki: identical entries (same stream, timestamp and line) are deduplicated on ingest;
- Tempo: a repeated span is stored twice; the query side merges a trace's spans by span id;
- the Parquet archive / ``--to-parquet``: the chunk's rows appear twice (dedup on topic, partition,
  offset when reading).

Entry points: ``streams.replay.cli`` (the command), ``streams.replay.runner.replay`` (the loop, for any
``Deliverer``), ``streams.replay.job.prepare`` (options to a checked, planned job). The package imports
nothing itself, so a tool that needs only the checkpoint or the time parser stays light.
"""
