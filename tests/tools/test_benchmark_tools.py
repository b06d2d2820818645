"""CPU smoke runs of the benchmark tools (tiny shapes, random weights): they run and print the JSON the GPU
session will record, with the GPU-only entries marked as not measured."""
import json
import subprocess

import pytest

from conftest import REPO_ROOT, TINY_SEMI_PRETRAINED_CONFIG, load_script
from hvlformer.modeling.pixel_decoder import ms_deform_attn_triton as msda_triton

benchmark_msdeformattn = load_script("tools/benchmark_msdeformattn.py")
benchmark = load_script("tools/benchmark.py")


def test_msdeformattn_benchmark_cpu_smoke(capsys, single_thread):
    report = benchmark_msdeformattn.main(["--device", "cpu", "--small", "--iters", "2", "--warmup", "0"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    cores = report["cores"]
    assert cores["pytorch"]["status"] == "measured"
    assert cores["pytorch"]["forward_ms"] > 0 and cores["pytorch"]["forward_backward_ms"] > 0
    assert cores["pytorch"]["peak_memory_mb"] is None  # no per-op peak on CPU
    # Triton on CPU: interpreter only -> a correctness check, never a time (unavailable where the kernels
    # are compiled for a GPU, i.e. when this suite runs on a CUDA machine)
    triton = cores["triton"]
    assert "forward_ms" not in triton
    if msda_triton.INTERPRETED:
        assert triton["status"].startswith("not measured")
        assert max(triton["max_abs_diff_vs_pytorch"].values()) < 1e-4
    else:
        assert triton["status"].startswith("unavailable")
    assert cores["cuda_op"]["status"].startswith("unavailable")
    assert report["ratios"]["fwd_bwd_speedup_vs_pytorch"] is None
    assert all(v is None for v in report["ratios"]["targets_met"].values())
    assert report["shapes"]["queries"] == 8 * 8 + 4 * 4 + 2 * 2


def test_msdeformattn_benchmark_real_shapes():
    value, shapes, start, loc, weights, grad_out = benchmark_msdeformattn.make_inputs(
        benchmark_msdeformattn.REAL, benchmark_msdeformattn.DTYPES["bfloat16"], benchmark_msdeformattn.torch.device("cpu"))
    assert value.shape == (8, 5376, 8, 32) and value.dtype == benchmark_msdeformattn.torch.bfloat16
    assert loc.shape == (8, 5376, 8, 3, 4, 2) and weights.shape == (8, 5376, 8, 3, 4)
    assert grad_out.shape == (8, 5376, 256) and shapes.tolist() == [[64, 64], [32, 32], [16, 16]]
    assert start.tolist() == [0, 4096, 5120]


def test_ratios_and_targets():
    cores = {"pytorch": {"forward_ms": 8.0, "forward_backward_ms": 30.0, "peak_memory_mb": 100.0},
             "triton": {"forward_ms": 2.0, "forward_backward_ms": 8.0, "peak_memory_mb": 10.0},
             "cuda_op": {"forward_ms": 2.5, "forward_backward_ms": 7.0, "peak_memory_mb": 12.0}}
    ratios = benchmark_msdeformattn._ratios(cores)
    assert ratios["fwd_bwd_speedup_vs_pytorch"] == 3.75 and ratios["peak_memory_fraction_of_pytorch"] == 0.1
    assert ratios["targets_met"] == {"fwd_bwd_speedup_vs_pytorch": True, "fwd_bwd_speedup_vs_cuda_op": False,
                                     "peak_memory_fraction_of_pytorch": True}


def test_parse_batch():
    assert benchmark.parse_batch("4+4") == (4, 4)
    assert benchmark.parse_batch("8") == (8, 0)
    for bad in ("4+", "a+b", "0+4", "1+2+3"):
        with pytest.raises(ValueError):
            benchmark.parse_batch(bad)


SMALL_MODEL = ["INPUT.CROP.SIZE", "(64, 64)", "MODEL.HVLFORMER.DEC_LAYERS", "2",
               "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1"]


def test_semi_sweep_cpu_smoke(capsys, tmp_path, single_thread):
    output = tmp_path / "sweep.json"
    report = benchmark.main(["--config-file", TINY_SEMI_PRETRAINED_CONFIG,
                             "--device", "cpu", "--sweep", "--batch-sizes", "1+1", "--amp", "off",
                             "--checkpointing", "on", "--iters", "1", "--warmup", "0", "--inference-images", "1",
                             "--output", str(output), *SMALL_MODEL])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert report["benchmark"] == "training_sweep" and len(report["results"]) == 1
    result = report["results"][0]
    assert result["batch"] == "1+1" and result["unlabeled_batch_size"] == 1
    assert result["gradient_checkpointing"] is True and result["amp"] is False
    assert result["msdeform_attn_core"] == "pytorch"  # "auto" on CPU
    assert result["train_step_s"] > 0 and result["train_images_per_s"] > 0
    assert result["inference_s_per_image"] > 0 and result["peak_memory_kind"] == "process peak RSS"


def test_gpu_checks_script_is_valid_bash():
    script = REPO_ROOT / "tools" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for tool in ("tools/benchmark_msdeformattn.py", "tools/benchmark.py",
                 "tests/modeling/pixel_decoder/test_ms_deform_attn_triton.py"):
        assert tool in text


def test_sweep_matrix_and_out_of_memory_are_recorded(monkeypatch, capsys):
    calls = []

    def fake_measure(cfg, device, labeled, unlabeled, iters, warmup, inference_images):
        calls.append((labeled, unlabeled, cfg.SOLVER.AMP.ENABLED, cfg.MODEL.HVLFORMER.CLIP.GRADIENT_CHECKPOINTING,
                      cfg.MODEL.SEM_SEG_HEAD.MSDEFORM_ATTN_IMPL, inference_images))
        if labeled == 8:
            raise benchmark.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore")
        return {"train_step_s": 1.0}

    monkeypatch.setattr(benchmark, "measure", fake_measure)
    report = benchmark.main(["--config-file", TINY_SEMI_PRETRAINED_CONFIG,
                             "--device", "cpu", "--sweep", "--batch-sizes", "4+4,8+8", "--impls", "auto,pytorch"])
    capsys.readouterr()
    assert len(calls) == 2 * 2 * 2 * 2  # impls x AMP x checkpointing x batches
    assert {c[:5] for c in calls} == {(b, b, a, g, i) for b in (4, 8) for a in (False, True) for g in (False, True)
                                      for i in ("auto", "pytorch")}
    # inference is timed once per (core, AMP): the first setting that trains without running out of memory
    assert sorted(c[2:5] for c in calls if c[5] > 0) == sorted(
        (a, False, i) for a in (False, True) for i in ("auto", "pytorch"))
    errors = [r for r in report["results"] if "error" in r]
    assert len(errors) == 8 and errors[0]["error"] == "out of memory: CUDA out of memory. Tried to allocate 2 GiB"
    assert errors[0]["batch"] == "8+8"
