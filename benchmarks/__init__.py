"""Images-per-second benchmarks of the real modules against same-run baselines (``python -m benchmarks run``).

Suites: ``shards_ingest`` (shards), ``model_step`` (model), ``pipeline_throughput`` (pipeline), ``end_to_end``
(e2e), ``scaling`` (multi-GPU). Shared pieces: ``timing`` (synchronised clocks, median of repeats),
``machine`` (what it ran on), ``flops`` (FLOPs per image, peak rates, MFU), ``report`` (JSON schema,
tables, plots), ``data`` (the benchmark corpus and shards), ``profiling`` (``--profile``).
"""
