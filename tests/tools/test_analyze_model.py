"""tools/analyze_model.py: parameter table and fvcore FLOPs (attention included) of the tiny config."""
import re

import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from torch import nn

from conftest import SMALL, TINY_CONFIG, TINY_PRETRAINED_CONFIG, load_script

analyze_model = load_script("tools/analyze_model.py")


def test_parameter_rows_add_up():
    model = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))
    model[1][1].weight.requires_grad_(False)
    rows = {name: (t, f) for name, t, f in analyze_model.parameter_rows(model, depth=2)}
    assert rows["model"] == (15 + 8 + 2, 4)
    assert rows["0"] == (15, 0) and rows["1"] == (10, 4) and rows["1.1"] == (2, 4)


def test_attention_handles_count_multiply_adds():
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 16)
    analysis = FlopCountAnalysis(Attention(), (q, k, v)).set_op_handle(**analyze_model.EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False)
    assert analysis.total() == 2 * 4 * 10 * 12 * 8 + 2 * 4 * 10 * 12 * 16

    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()  # fused fast path in eval without grad
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        analysis = FlopCountAnalysis(mha, (x, x, x)).set_op_handle(**analyze_model.EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False)
        total = analysis.total()
    assert total == 4 * 3 * 5 * 8 * 8 + 2 * 3 * 5 * 5 * 8  # 4 projections + QK^T + AV


def test_tables_for_the_tiny_config(capsys, single_thread):
    # the pretrained tiny config: its frozen reference encoder E_I^0 exists (random weights have none)
    code = analyze_model.main(["--config-file", TINY_PRETRAINED_CONFIG,
                               "--input-size", "64", "96", *SMALL])
    assert code == 0
    out = capsys.readouterr().out
    assert "## Parameters" in out and "## FLOPs of one 64x96 image" in out
    for module in ("backbone", "text_encoder", "pixel_decoder", "htqg", "ptrm", "transformer_decoder"):
        assert f"| {module} " in out
    assert "frozen reference encoder" in out
    gflops = float(re.search(r"Total: ([0-9.]+) GFLOPs", out).group(1))
    assert 0.005 < gflops < 1.0
    assert "_native_multi_head_attention" not in out.split("Total:")[1]  # counted, not listed as skipped


def test_thesis_module_table(capsys, single_thread):
    # standalone thesis modules at the tiny widths (no full model is built with --thesis-only)
    code = analyze_model.main(["--config-file", TINY_CONFIG,
                               "--input-size", "64", "64", "--thesis-only", "--vocabulary", "100", *SMALL])
    assert code == 0
    out = capsys.readouterr().out
    assert "## Thesis modules" in out and "## Parameters" not in out
    rows = {line.split(" | ")[0].strip("| ").split(" (")[0]: line.split(" | ") for line in out.splitlines()
            if line.startswith("| ") and "GFLOPs" not in line}
    assert set(rows) == {"CAA", "ECAC", "LSMSeg category filter", "LSMSeg class refinement", "LSMSeg visual fusion"}
    assert rows["LSMSeg category filter"][1] == "0"  # no parameters
    assert all(float(r[2]) > 0 for r in rows.values())  # every module was traced and counted
    # CAA at stride 8 of 64x64: P = 64, one fp32 P x P map = 4 * 64^2 bytes
    assert f"{4 * 64 ** 2 / 2 ** 20:.2f} MiB" in rows["CAA"][3]
