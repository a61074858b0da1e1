"""Model suite: pairs/s, peak memory and MFU of the real MoCo training step on synthetic tensors.

Measured in one run, on one device, with the real step (``train.train_step``: autocast, backward, optimizer):
precision (fp32 / bf16 / bf16 + channels_last / + torch.compile / + the step captured as a CUDA graph, on a GPU),
every shuffle-BN strategy that runs on one process, queue sizes, twice the per-GPU batch (with its own plain step),
and ``benchmarks/baseline.py`` (the original code's structure) at the same settings.

Every configuration is built and warmed up first, then all are timed in alternating rounds (round r times
each once), so that drift in machine speed does not favour whichever ran first. Peak memory (CUDA) is each
configuration's own: resident state plus one step's activations.

The MoCo-specific overhead (momentum update, shuffle, queue, logits) is the step time minus a *plain* step of
the same encoders: the query encoder's forward + backward, the key encoder's forward under no_grad and the
same optimizer, with none of the MoCo machinery. It is reported for ours and for the baseline, and their
ratio (baseline overhead / ours) says how much of that cost we removed.

On one process the ``gather`` strategy is an identity, which is also what the baseline does there, so the
precision rows and the baseline comparison use ``shuffle_bn=gather``; ``split`` (the single-GPU default, 8 BN
groups), ``none`` and ``sync`` are measured at bf16 + channels_last. ``all_to_all`` needs more than one rank.

Bytes received per rank per step by each shuffle-BN strategy for W = 2, 8, 64 come from tensor sizes, with
the formulas of ``benchmarks.traffic.traffic_bytes`` (the model's own accounting; stated in ``extra``).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

import config as config_lib
from benchmarks.context import Context
from benchmarks.flops import forward_flops_per_image, mfu, peak_bf16_flops
from benchmarks.report import Column, SuiteResult
from benchmarks.timing import measure_interleaved
from distributed import DistInfo

COLUMNS = [
    Column("pairs_per_s", "pairs/s", "{:,.1f}"),
    Column("step_ms", "step ms", "{:,.1f}"),
    Column("peak_mem_mib", "peak MiB", "{:,.0f}"),
    Column("mfu", "MFU", "{:.1%}"),
    Column("overhead_ms_signed", "MoCo overhead ms", "{:,.2f}"),
]


def _views(cfg: config_lib.Config, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Synthetic view pairs in the dtype and memory format the loader would hand over for this config."""
    from model import autocast_dtype

    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 3, cfg.data.crop_size, cfg.data.crop_size)
    amp = autocast_dtype(cfg.optim.precision, device)
    views = []
    for _ in range(2):
        x = torch.randn(shape, generator=gen).to(device=device, dtype=amp or torch.float32)
        views.append(x.contiguous(memory_format=torch.channels_last) if cfg.data.channels_last else x)
    return tuple(views)


def _moco_step(cfg: config_lib.Config, device: torch.device, baseline: bool) -> Callable[[], object]:
    """One real training step of ours (``model.MoCo``) or the original-structure baseline, as a closure."""
    import train
    from model import MoCo

    if baseline:
        from benchmarks.baseline import BaselineMoCo as cls
    else:
        cls = MoCo
    torch.manual_seed(cfg.run.seed)
    model = train.place_model(cls(cfg.model), cfg, DistInfo(device=device))
    optimizer, amp, scaler = train.build_optimization(cfg, model, device, config_lib.learning_rate(cfg, 1))
    model.train()
    view_q, view_k = _views(cfg, cfg.data.batch_size, device)
    momentum = cfg.model.momentum

    def step() -> object:
        return train.train_step(model, optimizer, scaler, view_q, view_k, momentum, amp, 0.0)

    return step


def _cuda_graphed(step: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``step`` captured once as a CUDA graph and replayed: one launch per step instead of one per kernel.

    The synthetic views are the same tensors every step, so the graph's static inputs are in place; learning rate
    and momentum are constants here. Autocast's weight-cast cache is off during capture (a graph must not keep
    tensors cached across steps; ``train_step``'s autocast inherits the global setting), and the warm-up runs on a
    side stream, as capture requires.
    """
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    finally:
        torch.set_autocast_cache_enabled(cache)
    return graph.replay


def _plain_step(cfg: config_lib.Config, device: torch.device) -> Callable[[], object]:
    """The same encoders with no MoCo machinery: query fwd + bwd, key fwd (no_grad), SGD step."""
    from model import autocast_dtype
    from model.encoder import build_encoder

    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    enc_q = build_encoder(m.arch, m.head, m.dim, m.mlp_hidden_dim, m.stem).to(device)
    enc_k = build_encoder(m.arch, m.head, m.dim, m.mlp_hidden_dim, m.stem).to(device)
    if cfg.data.channels_last:
        enc_q, enc_k = enc_q.to(memory_format=torch.channels_last), enc_k.to(memory_format=torch.channels_last)
    if m.compile:
        enc_q, enc_k = torch.compile(enc_q), torch.compile(enc_k)
    enc_q.train()
    enc_k.train()
    for p in enc_k.parameters():
        p.requires_grad_(False)
    o = cfg.optim
    optimizer = torch.optim.SGD(enc_q.parameters(), lr=config_lib.learning_rate(cfg, 1), momentum=o.sgd_momentum,
                                weight_decay=o.weight_decay)
    amp = autocast_dtype(o.precision, device)
    view_q, view_k = _views(cfg, cfg.data.batch_size, device)

    def step() -> object:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            q = enc_q(view_q)
            with torch.no_grad():
                k = enc_k(view_k)
            # A loss that touches q and k like InfoNCE's positive term, without queue or logits.
            loss = (q.float() * k.float()).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _build_and_warm(ctx: Context, name: str, build: Callable[[], Callable[[], object]],
                    warmup: int) -> tuple[Callable[[], object], float | None]:
    """Build one configuration's step, run its warm-up steps and measure its own peak memory (CUDA).

    Other configurations stay resident while this one runs, so its peak is taken relative to the memory
    allocated before it was built: its parameters, optimizer state and queue plus one step's activations.
    """
    device = ctx.device
    gc.collect()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    step = build()
    for _ in range(max(warmup, 1)):
        step()
    if device.type != "cuda":
        # CPU allocations are not tracked per region by torch: N/A rather than a process-wide RSS.
        return step, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return step, (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _variants(ctx: Context) -> list[tuple[str, str, dict, dict, bool | None]]:
    """(name, group, model updates, data/optim updates, baseline? (None: a plain encoder step)) for every
    configuration to measure.

    The shuffle-BN and queue rows run at the device's training precision: bf16 + channels_last on a GPU, fp32 on
    a CPU (CPUs without bf16 units run bf16 convolutions slower than fp32; ``precision=auto`` picks fp32 there).
    """
    s, cuda = ctx.sizes, ctx.device.type == "cuda"
    k = s.queue_sizes[-1]
    fp32 = {"precision": "fp32", "channels_last": False}
    bf16 = {"precision": "bf16", "channels_last": False}
    bf16_cl = {"precision": "bf16", "channels_last": True}
    main, tag = (bf16_cl, "bf16+cl") if cuda else (fp32, "fp32")
    gather = {"queue_size": k, "shuffle_bn": "gather"}
    out: list[tuple[str, str, dict, dict, bool | None]] = [
        ("ours fp32", "precision", gather, fp32, False),
        ("ours bf16", "precision", gather, bf16, False),
        ("ours bf16+cl", "precision", gather, bf16_cl, False),
        ("ours bf16+cl+compile", "precision", {**gather, "compile": True}, bf16_cl, False),
        ("ours bf16+cl+cudagraph", "precision", gather, {**bf16_cl, "cuda_graph": True}, False),
        ("baseline fp32", "baseline", {"queue_size": k}, fp32, True),
        ("baseline bf16+cl", "baseline", {"queue_size": k}, bf16_cl, True),
    ]
    for strategy in ("split", "none", "sync"):
        out.append((f"ours {tag} shuffle={strategy}", "shuffle_bn", {"queue_size": k, "shuffle_bn": strategy},
                    main, False))
    for q in s.queue_sizes[:-1]:
        out.append((f"ours {tag} K={q}", "queue", {"queue_size": q, "shuffle_bn": "gather"}, main, False))
    # A larger per-GPU batch (an H200 holds 512 easily): fewer, larger kernels; its plain step is the reference.
    big = {**main, "batch_size": 2 * s.model_batch}
    out.append((f"ours {tag} batch={2 * s.model_batch}", "batch", gather, big, False))
    out.append((f"plain encoder step {tag} batch={2 * s.model_batch}", "batch", gather, big, None))
    return out


def run(ctx: Context) -> SuiteResult:
    s, device = ctx.sizes, ctx.device
    cuda = device.type == "cuda"
    base = config_lib.replace(
        config_lib.Config(),
        data={"crop_size": s.crop_size, "batch_size": s.model_batch},
        model={"arch": s.arch, "shuffle_bn": "auto"},
        run={"device": device.type},
    )
    result = SuiteResult("model", config={"arch": s.arch, "crop_size": s.crop_size, "batch": s.model_batch,
                                          "queue_sizes": list(s.queue_sizes), "head": base.model.head,
                                          "shuffle_bn_default": "split (1 process)", "warmup": s.warmup,
                                          "iters": s.iters, "repeats": s.repeats, "device": str(device)},
                         columns=COLUMNS, plot_metric="pairs_per_s")
    flops = forward_flops_per_image(_encoder_for_flops(base), s.crop_size)
    peak = peak_bf16_flops(ctx.machine.get("gpu_name") if cuda else None)
    result.config.update(encoder_fwd_gflops_per_image=flops / 1e9, peak_bf16_tflops=peak / 1e12 if peak else None)
    if not peak:
        result.notes.append("MFU is N/A: " + ("no GPU" if not cuda else f"no peak rate known for {ctx.machine.get('gpu_name')}"))

    # 1. Build and warm up every configuration (ours, baseline, plain references); record memory per config.
    steps: dict[str, Callable[[], object]] = {}
    batches: dict[str, int] = {}  # pairs per step of each configuration
    meta: dict[str, tuple[str, dict, float | None, str]] = {}  # name -> (group, params, peak MiB, precision key)
    for name, group, model_upd, other, baseline in _variants(ctx):
        if not ctx.selects(name):
            continue
        if model_upd.get("compile") and ctx.quick and not cuda:
            result.skip(name, "--quick: torch.compile's warm-up takes minutes on a CPU (measured in full runs)")
            continue
        if ctx.quick and other["precision"] == "bf16" and (not cuda or name == "ours bf16"):
            # A CPU without bf16 units emulates bf16 convolutions several times slower than fp32.
            result.skip(name, "--quick: measured in full runs only" + ("" if cuda else " (bf16 is emulated on this CPU)"))
            continue
        if other.get("cuda_graph") and not cuda:
            result.skip(name, "CUDA graphs need a GPU")
            continue
        if other["precision"] == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            result.skip(name, "this GPU does not support bf16")
            continue
        batch = other.get("batch_size", s.model_batch)
        cfg = config_lib.replace(base, model=model_upd, data={"channels_last": other["channels_last"],
                                                              "batch_size": batch},
                                 optim={"precision": other["precision"]})
        key = f"{other['precision']}{'+cl' if other['channels_last'] else ''}{'+compile' if cfg.model.compile else ''}"
        # compile's first steps are the compilation: more warm-up so it is excluded.
        warmup = s.warmup + (3 if cfg.model.compile else 0)
        if baseline is None:  # a plain encoder step of its own (the batch rows' reference)
            steps[name], plain_mem = _build_and_warm(ctx, name, lambda c=cfg: _plain_step(c, device), warmup)
            meta[name] = ("reference", {**other}, plain_mem, key)
            batches[name] = batch
            continue
        graphed = bool(other.get("cuda_graph"))
        try:
            step, peak_mem = _build_and_warm(
                ctx, name, lambda c=cfg, b=baseline, g=graphed: (_cuda_graphed(_moco_step(c, device, b), device) if g
                                                                  else _moco_step(c, device, b)), warmup)
        except (ValueError, RuntimeError) as exc:
            if model_upd.get("shuffle_bn") != "sync" and not graphed:
                raise
            # SyncBatchNorm needs a process group on a GPU (torch falls back to plain BN on a CPU without one);
            # a step that cannot be captured as a CUDA graph is reported, not fatal.
            result.skip(name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        steps[name] = step
        batches[name] = batch
        meta[name] = (group, {"baseline": baseline, **model_upd, **other}, peak_mem, key)
        plain = f"plain encoder step {key}"
        if group in ("precision", "baseline") and plain not in steps:
            steps[plain], plain_mem = _build_and_warm(ctx, plain, lambda c=cfg: _plain_step(c, device), warmup)
            batches[plain] = batch
            meta[plain] = ("reference", {**other, "compile": cfg.model.compile}, plain_mem, key)

    # 2. Time them in alternating rounds, so that ours and the baseline see the same machine conditions.
    with ctx.profiler("model-steps"):
        timings = measure_interleaved(steps, items_per_call=batches, iters=s.iters, repeats=s.repeats,
                                      device=device)
    plain_ms: dict[str, float] = {}
    for name, tp in timings.items():
        group, params, peak_mem, key = meta[name]
        row = result.add(name, group, params, pairs_per_s=tp.items_per_s, step_ms=tp.seconds_per_call.scaled(1e3),
                         peak_mem_mib=peak_mem, mfu=mfu(tp.items_per_s.median, flops, peak))
        if group == "reference" and batches[name] == s.model_batch:
            plain_ms[key] = tp.seconds_per_call.median * 1e3
    for row in result.rows:
        key = meta[row.name][3]
        if row.group in ("precision", "baseline") and key in plain_ms:
            row.metrics["overhead_ms_signed"] = row.metrics["step_ms"].median - plain_ms[key]

    for key in ("fp32", "bf16+cl"):
        ours, base_name = ("ours " + key, "baseline " + key)
        names = {r.name for r in result.rows}
        if ours in names and base_name in names:
            result.compare(f"step pairs/s {key}: ours vs original structure", ours, base_name, "pairs_per_s")
            o = result.row(ours).metrics["overhead_ms_signed"]
            b = result.row(base_name).metrics["overhead_ms_signed"]
            result.extra.setdefault("moco_overhead", {})[key] = {
                "ours_ms_signed": o, "baseline_ms_signed": b,
                "plain_step_ms": plain_ms[key],
                # Only meaningful when both overheads are clearly above timing noise.
                **({"baseline_over_ours": b / o} if o > 0 and b > 0 else {}),
            }
    result.extra["shuffle_bn_bytes"] = _bytes_table(base, s.model_batch)
    result.markdown_extra = _markdown_extra(result.extra)
    result.notes.append("one process: shuffle_bn=gather is an identity (as in the baseline); all_to_all needs > 1 rank "
                        "(see extra.shuffle_bn_bytes and the scaling suite)")
    return result


def _encoder_for_flops(cfg: config_lib.Config) -> torch.nn.Module:
    from model.encoder import build_encoder

    m = cfg.model
    return build_encoder(m.arch, m.head, m.dim, m.mlp_hidden_dim, m.stem)


def _bytes_table(cfg: config_lib.Config, per_rank: int) -> dict:
    """Bytes received per rank per step by each shuffle-BN strategy, W = 2, 8, 64, with bf16 key views."""
    from benchmarks.traffic import traffic_bytes
    from model.shuffle import STRATEGIES

    encoder = _encoder_for_flops(cfg)
    bn = sum(m.num_features for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    image_bytes, key_bytes = 3 * cfg.data.crop_size ** 2 * 2, cfg.model.dim * 4
    table: dict = {
        "per_rank_batch": per_rank, "crop_size": cfg.data.crop_size, "image_bytes": image_bytes,
        "key_bytes": key_bytes, "bn_channels": bn,
        "formula": "bytes received per rank per step (benchmarks.traffic.traffic_bytes), B images per rank, I bytes "
                   "per key image, Kb per key: keys (W-1)*B*Kb for every strategy (one all-gather feeds unshuffle "
                   "and queue); gather + (W-1)*B*I images + W*B*8 permutation; all_to_all + (W-1)/W*B*I images; "
                   "sync + (W-1)*3*4 per BN channel; baseline (original) = gather with the keys gathered twice",
        "mib": {},
    }
    for strategy in (*STRATEGIES, "baseline"):
        table["mib"][strategy] = {
            f"W={w}": traffic_bytes(strategy, w, per_rank, image_bytes, key_bytes, bn)["total"] / 2**20
            for w in (2, 8, 64)
        }
    return table


def _markdown_extra(extra: dict) -> str:
    """The MoCo-overhead comparison and the bytes-per-strategy table as Markdown."""
    lines = []
    for key, o in extra.get("moco_overhead", {}).items():
        ratio = f"; baseline/ours = **{o['baseline_over_ours']:.2f}x**" if "baseline_over_ours" in o else ""
        lines.append(f"- MoCo-specific overhead {key} (step minus plain encoder step {o['plain_step_ms']:,.1f} ms): "
                     f"ours {o['ours_ms_signed']:,.1f} ms, baseline {o['baseline_ms_signed']:,.1f} ms{ratio}")
    table = extra["shuffle_bn_bytes"]
    lines += ["", f"MiB received per rank per step by each shuffle-BN strategy (per-rank batch "
                  f"{table['per_rank_batch']}, {table['crop_size']} px bf16 key views; {table['formula']}):", "",
              "| strategy | W=2 | W=8 | W=64 |", "|---|---:|---:|---:|"]
    for strategy, by_w in table["mib"].items():
        lines.append(f"| {strategy} | " + " | ".join(f"{by_w[w]:,.3f}" for w in ("W=2", "W=8", "W=64")) + " |")
    return "\n".join(lines)
