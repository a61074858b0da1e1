"""The model suite's ``+compile`` rows run end to end: ours and its compiled plain reference are built, warmed up,
timed and compared. The rows exist to be measured on a GPU, where a failure would waste device time; here
torch.compile is pointed at its ``eager`` backend (Dynamo capture, no code generation), so no compiler
warm-up is paid."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks import model_step
from benchmarks.context import Context, Sizes


@pytest.mark.slow  # ~20 s: bf16 ResNet-18 steps are emulated on this CPU
def test_compile_rows_are_measured_with_their_own_plain_reference(tmp_path, monkeypatch):
    calls, real_compile = [], torch.compile

    def compile_eagerly(fn, *args, **kwargs):
        calls.append(type(fn).__name__)
        return real_compile(fn, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()
    sizes = replace(Sizes.quick(1), crop_size=32, model_batch=8, warmup=1, iters=1, repeats=2)
    ctx = Context(out_dir=tmp_path, quick=False, device=torch.device("cpu"), sizes=sizes,
                  only=r"^ours bf16\+cl(\+compile)?$")
    result = model_step.run(ctx)

    names = {row.name for row in result.rows}
    assert names == {"ours bf16+cl", "ours bf16+cl+compile", "plain encoder step bf16+cl",
                     "plain encoder step bf16+cl+compile"}, names
    # MoCo compiles its query forward and key encoder; the plain reference compiles both encoders.
    assert sorted(calls) == ["Encoder", "Encoder", "Encoder", "QueryForward"]
    compiled = result.row("ours bf16+cl+compile")
    assert compiled.params["compile"] is True and compiled.metrics["pairs_per_s"].median > 0
    # Its overhead is taken against the compiled plain step, not the eager one.
    plain = result.row("plain encoder step bf16+cl+compile").metrics["step_ms"].median
    assert compiled.metrics["overhead_ms_signed"] == compiled.metrics["step_ms"].median - plain
