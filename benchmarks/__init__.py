"""Images-per-second benchmarks of the real modules against same-run baselines (``python -m benchmarks run``).

Suites: ``shards_ingest`` (shards), ``model_step`` (model), ``pipeline_throughput`` (pipeline), ``end_to_end``
(e2e), ``scaling`` (multi-GPU). Shared pieces: ``timing`` (synchronised clocks, repeats, loader windows),
``machine`` (what it ran on, the git commit), ``flops`` (FLOPs per image, peak rates, MFU), ``report`` (typed
results, JSON, tables, plots), ``data`` (the benchmark corpus and shards), ``tuned_torch_loader`` (the loader
baseline), ``profiling`` (``--profile`` traces, GPU utilisation).
"""
