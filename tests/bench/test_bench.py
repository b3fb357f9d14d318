"""The benchmark harness on CPU at tiny shapes: numbers are not asserted, only that the correctness
checks ran before timing and that the outputs (CSV rows, table, PNG) are well-formed."""
import csv
import os

import pytest
import torch

from mxfp4_compile.bench import __main__ as bench
from mxfp4_compile.bench import op as bench_op

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU harness test (tiny shapes)")

OP_FAST = ["--tokens", "1,8", "--min-replays", "2", "--replay-s", "0.005", "--r-sets", "2",
           "--no-progress"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def op_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["op", "--out", str(out), "--models", "tiny,tiny_glu", *OP_FAST]) == 0
    return out


def test_op_checks_then_times(op_out, capsys):
    rows = _rows(op_out / "op.csv")
    assert set(rows[0]) == set(bench_op.CSV_FIELDS)
    timed = [r for r in rows if r["status"] == "ok"]
    # reference (ours on CPU) and the bf16 grouped_mm peer, at both models and both T
    assert {(r["model"], int(r["T"]), r["kernel"]) for r in timed} == {
        (m, t, k) for m in ("tiny", "tiny_glu") for t in (1, 8) for k in ("reference", "bf16_grouped_mm")}
    for r in timed:
        assert r["check_passed"] == "True" and float(r["rel_l2"]) < 1e-2
        assert float(r["us"]) > 0 and float(r["floor_us"]) > 0 and float(r["pct_of_floor"]) > 0
        assert int(r["distinct_experts"]) >= 1 and int(r["mxfp4_bytes"]) > 0
    ref = [r for r in timed if r["kernel"] == "reference"]
    assert all(float(r["vs_bf16_grouped_mm"]) > 0 for r in ref)
    table = (op_out / "op.txt").read_text()
    assert "tiny_glu" in table and "bf16_grouped_mm" in table and "not run: triton" in table
    assert (op_out / "op.json").stat().st_size > 0


def test_op_failed_check_is_not_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_op, "bf16_grouped_moe", lambda x, *a, **k: torch.zeros_like(x))
    assert bench.main(["op", "--out", str(tmp_path), "--models", "tiny", "--tokens", "8",
                       "--kernels", "bf16_grouped_mm", *OP_FAST[2:]]) == 0
    (r,) = _rows(tmp_path / "op.csv")
    assert r["status"] == "check_failed" and r["check_passed"] == "False" and r["us"] == ""


def test_plot_png(op_out):
    assert bench.main(["plot", "--out", str(op_out)]) == 0
    png = op_out / "roofline.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_e2e_tiny(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert bench.main(["e2e", "--out", str(tmp_path), "--batches", "2", "--prefill", "0",
                       "--iters", "2", "--no-progress"]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out
    rows = _rows(tmp_path / "e2e.csv")
    assert [(r["backend"], r["shape"]) for r in rows] == [("inductor", "decode_b2"), ("mxfp4", "decode_b2")]
    for r in rows:
        assert r["status"] == "ok", r["note"]
        assert float(r["median_us"]) > 0 and float(r["first_call_s"]) > 0
        assert int(r["expert_weight_bytes"]) > 0
    mx = rows[1]
    assert mx["kernel"] == "reference" and int(mx["rewritten_moe"]) == 1
    assert 0 < float(mx["rel_l2_vs_inductor"]) < 0.5  # MXFP4 weights: close to bf16, not equal
    assert os.path.getsize(tmp_path / "e2e.txt") > 0


def test_help_explains_every_flag(capsys):
    for cmd in ("op", "e2e", "plot"):
        with pytest.raises(SystemExit):
            bench.main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "--out" in text and "show this help" in text
