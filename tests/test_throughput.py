"""The throughput benchmark on a tiny CPU config: every key with a sane value, each figure from
its own timing, the per-image loop equal to the batched corruption, FLOP counts by hand, the
peak table, compile failures, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mfm import cli, flops, throughput
from mfm.config import Params
from mfm.frequency import RandomFrequencyMask

EXPECTED_KEYS = {
    "model",
    "pretext",
    "img_size",
    "channels",
    "batch_size",
    "timed_steps",
    "warmup_steps",
    "device",
    "device_name",
    "threads",
    "torch",
    "amp_requested",
    "amp",
    "amp_note",
    "channels_last",
    "channels_last_note",
    "compile",
    "compile_seconds",
    "compile_error",
    "images_per_second",
    "step_ms",
    "corruption_ms",
    "loss_ms",
    "frequency_share",
    "supervised_classes",
    "supervised_images_per_second",
    "supervised_step_ms",
    "mfm_over_supervised",
    "corruption_loop_ms",
    "corruption_loop_over_batched",
    "step_gflop",
    "achieved_tflops",
    "peak_tflops",
    "peak_precision",
    "mfu",
    "supervised_step_gflop",
    "supervised_achieved_tflops",
    "supervised_mfu",
    "mfu_note",
    # the input path on an image folder (bench --data, null here): tests/test_bench_data.py
    *throughput.DATA_KEYS,
}
POSITIVE = (
    "images_per_second",
    "step_ms",
    "corruption_ms",
    "loss_ms",
    "frequency_share",
    "supervised_images_per_second",
    "supervised_step_ms",
    "mfm_over_supervised",
    "corruption_loop_ms",
    "corruption_loop_over_batched",
)


def tiny_params(name: str = "vit_tiny_patch16_224", **model: Any) -> Params:
    """A 1-block ViT (or a tiny CNN) at 16 px with batch 4, on the CPU."""
    model_section = {"name": name, "patch_size": 4, "kwargs": {"depth": 1}, **model}
    return Params.model_validate(
        {
            "data": {"img_size": 16, "download": False},
            "model": model_section,
            "pretrain": {"batch_size": 4, "mask": {"radius": 3}},
            "runtime": {"device": "cpu", "amp": True},
        }
    )


def tiny_run(params: Params | None = None, **options: Any) -> dict[str, Any]:
    return throughput.run(params or tiny_params(), 4, steps=1, warmup=1, channels=3, **options)


@pytest.fixture(scope="module")
def vit_result() -> dict[str, Any]:
    return tiny_run(mfu=True, channels_last=True)


def test_every_key_with_sane_values(vit_result):
    out = vit_result
    assert set(out) == EXPECTED_KEYS
    assert [key for key in out if key not in throughput.__doc__] == []  # every key documented
    json.dumps(out)  # flat and serialisable
    assert not any(isinstance(v, dict | list) for v in out.values())
    for key in POSITIVE:
        assert math.isfinite(out[key]) and out[key] > 0, key
    # one timed step, after the 2 untimed calls torch's Timer makes even when 1 is asked for
    assert (out["device"], out["batch_size"], out["timed_steps"], out["warmup_steps"]) == (
        "cpu",
        4,
        1,
        2,
    )
    assert isinstance(out["device_name"], str) and out["device_name"]
    assert out["supervised_classes"] == throughput.SUPERVISED_CLASSES


def test_each_figure_comes_from_its_own_timing(monkeypatch):
    """A fake clock gives each timed function its own duration: every figure must follow from
    the right one, in the right unit, with the right batch."""
    seconds = {"mfm": 0.5, "corrupt_only": 0.004, "loss_only": 0.006, "loop": 0.1, "sup": 0.25}
    timed: list[str] = []

    def fake_mean_seconds(fn, calls, warmup=0):
        fn()  # the timed code still has to run
        name = fn.__name__
        if name == "step":  # the MFM step is timed first, the supervised one last
            name = "sup" if "mfm" in timed else "mfm"
        timed.append(name)
        return seconds[name]

    monkeypatch.setattr(throughput, "mean_seconds", fake_mean_seconds)
    out = tiny_run()
    assert timed == ["mfm", "corrupt_only", "loss_only", "loop", "sup"]
    assert out["step_ms"] == pytest.approx(500.0)
    assert out["images_per_second"] == pytest.approx(8.0)  # batch 4 in 0.5 s
    assert out["corruption_ms"] == pytest.approx(4.0) and out["loss_ms"] == pytest.approx(6.0)
    assert out["frequency_share"] == pytest.approx(0.02)
    assert out["supervised_step_ms"] == pytest.approx(250.0)
    assert out["supervised_images_per_second"] == pytest.approx(16.0)
    assert out["mfm_over_supervised"] == pytest.approx(2.0)
    assert out["corruption_loop_ms"] == pytest.approx(100.0)
    assert out["corruption_loop_over_batched"] == pytest.approx(25.0)


def test_cpu_says_amp_has_no_effect_and_vit_ignores_channels_last(vit_result):
    assert vit_result["amp_requested"] is True and vit_result["amp"] is False
    assert "no effect on cpu" in vit_result["amp_note"]
    assert vit_result["channels_last"] is False
    assert "ViT" in vit_result["channels_last_note"]
    assert vit_result["compile"] is False
    assert vit_result["compile_seconds"] is None and vit_result["compile_error"] is None


def test_cpu_mfu_reports_achieved_tflops_and_no_mfu(vit_result):
    out = vit_result
    assert out["step_gflop"] > 0 and out["supervised_step_gflop"] > 0
    assert out["achieved_tflops"] > 0 and out["supervised_achieved_tflops"] > 0
    assert out["peak_precision"] is None
    assert out["mfu"] is None and out["supervised_mfu"] is None and out["peak_tflops"] is None
    assert "achieved TFLOP/s only" in out["mfu_note"]


def test_cnn_channels_last_given_peak_and_no_mfu_keys_without_mfu():
    out = tiny_run(tiny_params("test_resnet", kwargs={}), channels_last=True, amp=False)
    assert out["channels_last"] is True and out["channels_last_note"] is None
    assert out["amp_requested"] is False and out["amp_note"] is None
    for key in ("step_gflop", "achieved_tflops", "peak_tflops", "mfu", "mfu_note"):
        assert out[key] is None
    given = tiny_run(tiny_params("test_resnet", kwargs={}), peak=2.0)  # a peak implies --mfu
    assert given["peak_tflops"] == 2.0 and given["peak_precision"] == "given"
    assert given["mfu"] == pytest.approx(given["achieved_tflops"] / 2.0)


def test_loop_is_null_for_restoration_pretexts():
    params = tiny_params()
    params.pretrain.pretext = "denoise"
    out = tiny_run(params)
    assert out["corruption_loop_ms"] is None and out["corruption_loop_over_batched"] is None
    assert out["corruption_ms"] > 0


# -- the per-image loop does the batched corruption's math ---------------------------------


@pytest.mark.parametrize("size", [(16, 16), (12, 10), (9, 7)])
@pytest.mark.parametrize(("radius", "inner"), [(3.0, 0.0), (2.5, 1.0)])
@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("low", [True, False])
def test_per_image_loop_equals_batched_corruption(size, radius, inner, clamp, low):
    torch.manual_seed(0)
    x = torch.rand(4, 3, *size)
    batched = RandomFrequencyMask(radius, inner, p_low=1.0 if low else 0.0, clamp=clamp)
    expected, mask = batched.corrupt(x)
    loop = throughput.per_image_frequency_mask(x, [low] * 4, [radius] * 4, inner, clamp)
    torch.testing.assert_close(loop, expected, atol=1e-5, rtol=1e-5)
    if not clamp:  # the loop's mask is the batched one: low + high adds back to the image
        other = throughput.per_image_frequency_mask(x, [not low] * 4, [radius] * 4, inner, False)
        torch.testing.assert_close(loop + other, x, atol=1e-5, rtol=1e-5)
    kept = mask[:, :, size[0] // 2, size[1] // 2 + 2]  # 2 bins from DC: inside the disc/band
    assert bool(kept.all()) is low


def test_per_image_loop_follows_mixed_draws_of_the_batch():
    torch.manual_seed(1)
    x = torch.rand(6, 1, 12, 12)
    batched = RandomFrequencyMask(3.0, p_low=0.5)
    expected, mask = batched.corrupt(x)
    keep_low = mask[:, 0, 6, 6].bool().tolist()  # DC kept = low-pass
    assert 0 < sum(keep_low) < 6
    loop = throughput.per_image_frequency_mask(x, keep_low, [3.0] * 6)
    torch.testing.assert_close(loop, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p_low", [0.0, 1.0])
def test_the_timed_loop_uses_the_corruptions_settings(p_low):
    corruption = RandomFrequencyMask((0.25, 0.25), radius_unit="fraction", p_low=p_low)
    x = torch.rand(4, 3, 16, 16)
    expected, _ = corruption.corrupt(x)
    loop = throughput._loop_corruption(corruption, x)
    torch.testing.assert_close(loop(), expected, atol=1e-5, rtol=0)


# -- FLOPs and the peak table ----------------------------------------------------------------


def test_flops_of_a_linear_step_by_hand():
    batch, fan_in, fan_out = 2, 8, 4
    layer = nn.Linear(fan_in, fan_out)
    x = torch.randn(batch, fan_in)
    matmul = 2 * batch * fan_in * fan_out  # one multiply-add = 2 FLOPs
    # forward y = x W^T, backward dW = dy^T x (x needs no grad): two matmuls
    assert flops.count_flops(lambda: layer(x).sum().backward()) == 2 * matmul
    x.requires_grad_(True)  # + dx = dy W
    assert flops.count_flops(lambda: layer(x).sum().backward()) == 3 * matmul


def test_flops_of_cpu_attention_are_counted():
    batch, heads, tokens, dim = 1, 2, 5, 8
    q, k, v = (torch.randn(batch, heads, tokens, dim) for _ in range(3))
    expected = 2 * (2 * batch * heads * tokens * dim * tokens)  # q k^T, then (.) v
    assert flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == expected


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("NVIDIA H100 80GB HBM3", "fp32", 67.0),
        ("NVIDIA H100 NVL", "bf16", None),
        ("Tesla T4", "bf16", None),
    ],
)
def test_peak_table(name, precision, peak):
    assert flops.peak_tflops(name, precision) == peak


def test_mfu_on_a_known_and_an_unknown_gpu():
    mfm = throughput.StepTiming(seconds=0.5, flops=10**12)
    sup = throughput.StepTiming(seconds=0.25, flops=10**12)
    cuda = torch.device("cuda")
    out = flops.mfu_figures(mfm, sup, cuda, "NVIDIA H200", amp_on=True)
    assert out["achieved_tflops"] == pytest.approx(2.0) and out["peak_precision"] == "bf16"
    assert out["mfu"] == pytest.approx(2.0 / 989.0)
    assert out["supervised_mfu"] == pytest.approx(4.0 / 989.0) and out["mfu_note"] is None
    unknown = flops.mfu_figures(mfm, sup, cuda, "Tesla T4", amp_on=True)
    assert unknown["mfu"] is None and "--peak-tflops" in unknown["mfu_note"]


# -- torch.compile failures are results --------------------------------------------------------


def test_compile_failure_is_reported_not_raised(monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no compiler on this platform\n\n  gcc: not found\nlong traceback")

    monkeypatch.setattr(torch, "compile", broken)
    out = tiny_run(compile=True)
    assert out["compile"] is False and out["compile_seconds"] is None
    assert out["compile_error"] == "RuntimeError: no compiler on this platform / gcc: not found"
    assert out["images_per_second"] > 0 and out["supervised_images_per_second"] > 0


def test_a_supervised_compile_failure_is_named(monkeypatch):
    calls = []

    def compile_once(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        calls.append(model)
        if len(calls) > 1:
            raise RuntimeError("cannot compile the classifier")
        return model  # "compiles" the MFM model to itself

    monkeypatch.setattr(torch, "compile", compile_once)
    out = tiny_run(compile=True)
    assert out["compile"] is False and out["compile_seconds"] is None
    assert out["compile_error"] == "supervised: RuntimeError: cannot compile the classifier"


def test_compile_failure_at_the_first_call_falls_back_to_eager(monkeypatch):
    class FailsWhenCalled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("backend compiler failed")

    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: FailsWhenCalled())
    layer = nn.Linear(3, 2)
    calls = []

    def make_step(forward: nn.Module):
        def step() -> None:
            calls.append(forward)
            forward(torch.randn(2, 3)).sum().backward()

        return step

    timing = throughput.time_training_step(layer, make_step, 2, 1, compile=True)
    assert timing.compile_error == "RuntimeError: backend compiler failed"
    assert timing.compile_seconds is None and timing.seconds > 0
    assert all(forward is layer for forward in calls[1:])  # the eager layer was timed


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("runtime:\n  device: cpu\n")
    return path


@pytest.mark.parametrize(
    "bad",
    [
        ["--steps", "0"],
        ["--batch-size", "0"],
        ["--batch-size", "-3"],
        ["--channels", "0"],
        ["--warmup", "-1"],
        ["--peak-tflops", "0"],
        ["--peak-tflops", "-5"],
        ["--peak-tflops", "nan"],
        ["--peak-tflops", "inf"],
    ],
)
def test_cli_rejects_bad_numbers_in_one_line(bad, params_file, capsys, monkeypatch):
    monkeypatch.setattr(throughput, "run", lambda *a, **k: pytest.fail("bench ran"))
    assert cli.main(["bench", "--params", str(params_file), *bad]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("mfm bench: error:")


def test_cli_rejects_a_non_number(params_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--params", str(params_file), "--steps", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_cli_passes_the_options_through(params_file, capsys, monkeypatch):
    seen: dict[str, Any] = {}

    def fake_run(params, batch_size, steps, warmup, channels, **options):
        seen.update(batch_size=batch_size, steps=steps, warmup=warmup, channels=channels)
        seen.update(options)
        return {"images_per_second": 1.0}

    monkeypatch.setattr(throughput, "run", fake_run)
    argv = ["bench", "--params", str(params_file), "--batch-size", "4", "--steps", "2"]
    argv += ["--no-amp", "--channels-last", "--compile", "--peak-tflops", "100"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"images_per_second": 1.0}
    assert seen == {
        "batch_size": 4,
        "steps": 2,
        "warmup": 3,
        "channels": 3,
        "amp": False,
        "channels_last": True,
        "compile": True,
        "mfu": False,
        "peak": 100.0,
        "data": None,
        "workers": None,
    }
    cli.main(["bench", "--params", str(params_file), "--amp", "--mfu"])
    assert seen["amp"] is True and seen["mfu"] is True and seen["peak"] is None
    cli.main(["bench", "--params", str(params_file)])
    assert seen["amp"] is None and seen["batch_size"] == Params().pretrain.batch_size
