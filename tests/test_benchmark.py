"""benchmark.py: one command prints every speed figure; checked for completeness and consistency
(never for a speed: tests do not assert wall-clock times)."""
import json
from pathlib import Path

import pytest
import torch

from model import build_model
from tools import benchmark

ROOT = Path(__file__).resolve().parents[1]

FAST = ["--batch", "2", "--repeats", "1", "--warmup", "1", "--loader-batches", "2", "--no-engines"]


def test_every_figure_is_reported_and_consistent(tmp_path, capsys):
    out = tmp_path / "figures.json"
    result = benchmark.run(benchmark.parse_args(["--preset", "smoke", "--workers", "0", "--json", str(out)] + FAST))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(out.read_text())
    for key in ("latency_eager_fp32_ms", "latency_fast_ms", "inference_images_per_s", "train_images_per_s"):
        pair = result[key]
        assert pair["with_block"] > 0 and pair["without_block"] > 0
        ratio = (pair["with_block"] / pair["without_block"] if key.endswith("_ms")
                 else pair["without_block"] / pair["with_block"])  # a rate's cost is the inverse ratio
        assert result[f"{key}_block_cost"] == pytest.approx(ratio)
    assert result["loader_samples_per_s"] > 0 and result["model"] == "smoke" and result["size"] == 64


def test_a_checkpoints_architecture_and_the_reference_deformable_conv(tmp_path):
    torch.manual_seed(0)
    net = build_model("smoke", input_size=96)
    torch.save({"model": net.state_dict(), "config": net.config.to_dict()}, tmp_path / "best.pth")
    args = ["--ckpt", str(tmp_path / "best.pth"), "--workers", "-1", "--deform-impl", "torchvision"] + FAST
    result = benchmark.run(benchmark.parse_args(args))
    assert result["size"] == 96 and result["deform_impl"] == "torchvision"
    assert "loader_samples_per_s" not in result  # --workers -1 skips it


def test_bad_flags_are_rejected():
    for argv in (["--batch", "0"], ["--size", "100"], ["--deform-impl", "cuda"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)


def test_batch_1_measures_what_it_can_and_says_why_training_is_skipped(capsys):
    result = benchmark.run(benchmark.parse_args(["--preset", "smoke", "--workers", "-1", "--batch", "1", "--repeats", "1",
                                                 "--no-engines",
                                                 "--warmup", "0"]))
    assert result["latency_eager_fp32_ms"]["with_block"] > 0 and result["latency_fast_ms"]["without_block"] > 0
    assert "train_images_per_s" not in result and "BatchNorm" in result["train_skipped"]
    assert "--batch 2" in result["train_skipped"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))


def test_a_size_beyond_the_devices_memory_is_refused_before_allocating(monkeypatch):
    from model import PRESETS
    monkeypatch.setattr(benchmark, "make_models", lambda *a: pytest.fail("models were built"))
    with pytest.raises(ValueError, match=r"--size 99968 at --batch 32: the decoder's self-attention .* the largest "
                                         r"--size that fits is \d+"):
        benchmark.run(benchmark.parse_args(["--preset", "smoke", "--size", "99968"]))
    cfg = PRESETS["paper"].model  # hand-worked: 416 px -> 26 x 26 = 676 tokens; 2 x 8 heads x 676^2 x 4 bytes
    assert benchmark.attention_bytes(cfg, 416, 2) == 2 * 8 * 676 ** 2 * 4
    benchmark.check_size(cfg, 416, 2, 2 * 8 * 676 ** 2 * 4)  # exactly fits
    with pytest.raises(ValueError, match="the largest --size that fits is 416"):
        benchmark.check_size(cfg, 448, 2, 2 * 8 * 676 ** 2 * 4)


def test_an_absurd_size_exits_with_one_line():
    from tooling import one_line_error, run_tool
    proc = run_tool("benchmark.py", "--preset", "smoke", "--size", "99968", "--workers", "-1")
    assert "--size 99968 at --batch 32" in one_line_error(proc, code=1)


@pytest.mark.slow  # exports the model to ONNX and converts it for OpenVINO
def test_latency_only_times_every_engine_installed_beside_the_cpus_limits(tmp_path):
    from tooling import run_tool
    out = tmp_path / "engines.json"
    proc = run_tool("benchmark.py", "--preset", "smoke", "--latency-only", "--repeats", "1", "--warmup", "0",
                    "--json", out, env={"SEGVLM_ENGINE": ""}, timeout=900, check=True)  # "auto" as a user has it
    result = json.loads(out.read_text())
    ms = result["engine_latency_ms"]
    assert set(ms) == {"eager_fp32", "torch", "openvino", "onnxruntime", "openvino_onnx_defaults"}
    assert result["engine"] == "openvino" and result["engine_one_image"] == "torch" and min(ms.values()) > 0
    assert result["engine_speedup_over_eager_fp32"]["openvino"] == pytest.approx(ms["eager_fp32"] / ms["openvino"])
    floor = result["floor_ms"][result["engine_precision"]]
    assert floor == pytest.approx(1000 * result["model_gflop"] / result["matmul_gflops"][result["engine_precision"]])
    assert result["default_fraction_of_floor"] == pytest.approx(floor / ms["openvino"])
    assert set(result["cpu"]) == {"name", "capability", "avx512_bf16", "amx"}
    assert "<- default" in proc.stdout and "reaches" in proc.stdout and "latency_eager_fp32_ms" in result
