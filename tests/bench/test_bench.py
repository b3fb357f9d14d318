"""The benchmark harness on CPU at tiny shapes: numbers are not asserted, only that the correctness
checks ran before timing and that the outputs (CSV rows, table, PNG) are well-formed; and the
floor rules as pure functions (which bandwidth measurement wins, which times get flagged)."""
import contextlib
import csv
import io
import json
import math

import pytest
import torch

from mxfp4_compile.bench import __main__ as bench
from mxfp4_compile.bench import floors as bench_floors
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
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert bench.main(["op", "--out", str(out), "--models", "tiny,tiny_glu", *OP_FAST]) == 0
    (out / "stdout.txt").write_text(buf.getvalue())
    return out


@pytest.mark.slow
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


@pytest.mark.slow
def test_op_says_what_the_numbers_are(op_out):
    rows = _rows(op_out / "op.csv")
    for r in rows:  # the CPU figure is a nominal memcpy, marked as such in every row
        assert r["floor_bw_source"] == "memcpy, CPU wall clock: meaningless"
        assert float(r["floor_GBps"]) > 0 and r["bw_candidates"].startswith("memcpy ")
        assert float(r["copy_GBps"]) == float(r["floor_GBps"])
    table = (op_out / "op.txt").read_text()
    assert "CPU: wall-clock medians, no CUDA graphs, numbers meaningless" in table
    assert "CUDA graph, median" not in table and "L2 cold" not in table
    assert "floor bandwidth" in table and "= memcpy, CPU wall clock: meaningless" in table
    stdout = (op_out / "stdout.txt").read_text()
    assert stdout.count("flashinfer:") == 1 and stdout.count("not run:") == 1


def test_pick_bandwidth_takes_the_largest_figure():
    cands = {"memcpy": 2433.0, "copy uint8": 2950.0, "copy int32": 3021.0, "copy int64": None,
             "read stream": 3010.0}
    bw = bench_floors.pick_bandwidth(cands)
    assert (bw.GBps, bw.source, bw.label, bw.meaningful) == (3021.0, "copy int32", "copy int32", True)
    assert bw.candidates == cands and bw.best_copy_GBps == 3021.0
    assert bw.candidates_str() == ("memcpy 2433; copy uint8 2950; copy int32 3021; copy int64 n/a; "
                                   "read stream 3010")
    assert bw.describe().startswith("3021 GB/s = copy int32 (max of memcpy 2433;")
    # the read stream wins when it is the fastest; the best copy is still reported apart
    bw = bench_floors.pick_bandwidth({"memcpy": 2433.0, "read stream": 3100.0})
    assert (bw.GBps, bw.source, bw.best_copy_GBps) == (3100.0, "read stream", 2433.0)
    # a tie goes to the first measured; unusable figures never win
    assert bench_floors.pick_bandwidth({"a": 5.0, "b": 5.0}).source == "a"
    bw = bench_floors.pick_bandwidth({"nan": math.nan, "inf": math.inf, "neg": -1.0, "zero": 0.0,
                                      "ok": 1.0}, meaningful=False)
    assert (bw.source, bw.label) == ("ok", "ok, CPU wall clock: meaningless")
    assert bench_floors.pick_bandwidth({"read stream": 9.0}).best_copy_GBps is None
    with pytest.raises(ValueError):
        bench_floors.pick_bandwidth({"memcpy": None, "read stream": math.nan})


def test_measure_bandwidth_on_cpu_is_nominal():
    bw = bench_floors.measure_bandwidth("cpu", nbytes=1 << 20)
    assert bw.source == "memcpy" and not bw.meaningful and list(bw.candidates) == ["memcpy"]
    assert bw.GBps > 0


def test_floor_check_flags_times_under_a_floor():
    fc = bench_floors.floor_check
    floors = {"byte floor": 10.0, "stream floor": None, "FLOP floor": 2.0}
    assert fc(10.0, floors) == "" and fc(25.0, floors) == "" and fc(None, floors) == ""
    assert fc(9.0, floors) == "faster than floor: re-check (byte floor 0.900x)"
    assert fc(1.0, dict(floors, **{"stream floor": 4.0})) == (
        "faster than floor: re-check (byte floor 0.100x, stream floor 0.250x, FLOP floor 0.500x)")


def test_op_failed_check_is_not_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_op, "bf16_grouped_moe", lambda x, *a, **k: torch.zeros_like(x))
    assert bench.main(["op", "--out", str(tmp_path), "--models", "tiny", "--tokens", "8",
                       "--kernels", "bf16_grouped_mm", *OP_FAST[2:]]) == 0
    (r,) = _rows(tmp_path / "op.csv")
    assert r["status"] == "check_failed" and r["check_passed"] == "False" and r["us"] == ""


def test_op_flags_a_time_faster_than_its_floor(tmp_path, monkeypatch):
    # a bandwidth far too low makes the byte floor longer than any measured time
    slow = bench_floors.pick_bandwidth({"memcpy": 1e-9}, meaningful=False)
    monkeypatch.setattr(bench_op.F, "measure_bandwidth", lambda device: slow)
    assert bench.main(["op", "--out", str(tmp_path), "--models", "tiny", "--tokens", "8",
                       "--kernels", "bf16_grouped_mm", *OP_FAST[2:]]) == 0
    (r,) = _rows(tmp_path / "op.csv")
    assert r["status"] == "ok" and float(r["pct_of_floor"]) > 100
    assert r["floor_check"].startswith(bench_floors.RECHECK + " (byte floor ")
    assert "  !! faster than floor: re-check (byte floor " in (tmp_path / "op.txt").read_text()


@pytest.mark.slow
def test_plot_png(op_out):
    assert bench.main(["plot", "--out", str(op_out)]) == 0
    png = op_out / "roofline.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.slow
def test_plot_reads_a_csv_without_the_floor_columns(op_out, tmp_path):
    rows = _rows(op_out / "op.csv")
    old = [f for f in rows[0] if f not in ("floor_GBps", "floor_bw_source", "bw_candidates", "floor_check")]
    with open(tmp_path / "old.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    assert bench.main(["plot", "--csv", str(tmp_path / "old.csv"), "--png", str(tmp_path / "old.png")]) == 0
    assert (tmp_path / "old.png").stat().st_size > 10_000


@pytest.mark.slow
def test_e2e_tiny(tmp_path, capsys):
    """generate with a static cache through each compiled forward: every row ran, decode and
    time-to-first-token timed, the MXFP4 rows rewrote every layer and report their kernel."""
    pytest.importorskip("transformers")
    assert bench.main(["e2e", "--out", str(tmp_path), "--batches", "2", "--prefill", "10",
                       "--rounds", "1", "--new-tokens", "8", "--check", "--check-control",
                       # calm experts: at full scale one rounding can flip a random router's pick
                       # and move this model's logits by ~0.5 (the control's prefill did)
                       "--expert-scale", "0.25", "--no-progress"]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out
    rows = _rows(tmp_path / "e2e.csv")
    check = rows.pop()
    control = rows.pop()  # stock Inductor's bf16 compile against bf16 eager, before quantizing
    assert (control["group"], control["backend"], control["status"]) == ("check", "inductor", "ok"), control["note"]
    assert 0 <= float(control["logits_rel_l2"]) < 2e-2 and "bf16 weights" in control["note"]
    assert [(r["group"], r["backend"]) for r in rows] == [
        ("decode_b2", "mxfp4"), ("decode_b2", "inductor"), ("prefill_10", "mxfp4"), ("prefill_10", "inductor")]
    assert (check["group"], check["backend"], check["status"]) == ("check", "mxfp4", "ok"), check["note"]
    assert 0 <= float(check["logits_rel_l2"]) < 2e-2  # same MXFP4 weights, bf16 logits
    assert float(check["logits_rel_l2_torch_topk"]) >= 0 and int(check["router_ties"]) >= 0
    assert check["first_diff"] == "" or float(check["margin_at_diff"]) <= 2 * float(check["dlogit_at_diff"]) + 1e-6
    for r in rows:
        assert r["status"] == "ok", r["note"]
        assert float(r["median_ms"]) > 0 and float(r["compile_s"]) > 0 and r["rounds"] == "1"
    assert float(rows[0]["floor_ms"]) > 0 and rows[2]["floor_ms"] == ""
    with open(tmp_path / "e2e.json") as f:
        by_backend = {r["backend"]: r for r in json.load(f)["rows"] if r["group"] == "decode_b2"}
    for r in rows[:2]:  # decode: the interval between forwards within the N-token generate
        whole = by_backend[r["backend"]]["generate_ms"]
        assert len(whole) == 1 and 0 < float(r["step_ms"]) < whole[0], (r, whole)
    assert rows[2]["step_ms"] == ""  # time to first token: one forward
    assert rows[0]["kernel"] == "reference" and int(rows[0]["rewritten_moe"]) == 2
    assert "decode_b2" in (tmp_path / "e2e.txt").read_text()


def test_e2e_routes_switch_what_generate_compiles():
    """``use``: a compiled forward turns transformers' own decode compile off; the CompileConfig
    route restores the plain forward and hands generate our backend, which then compiles decode
    (on CPU through the config's _compile_all_devices; its prefill runs eager, in bf16)."""
    pytest.importorskip("transformers")
    import argparse
    from mxfp4_compile import backend
    from mxfp4_compile.bench import e2e
    args = argparse.Namespace(size="tiny", layers=2, prefill=8, new_tokens=4, seed=0)
    m = e2e.build_model(args, torch.device("cpu"))
    ids = torch.randint(3, 200, (1, 8))
    torch._dynamo.reset()
    fwd = e2e.compiled_forward(m, "mxfp4", False, {})
    e2e.use(m, fwd)
    assert m.forward is fwd and m.generation_config.disable_compile
    with torch.no_grad():
        m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    torch._dynamo.reset()  # on CPU (no mode) both routes' backend is one object: they share graphs
    cfg = e2e.compiled_forward(m, e2e.CONFIG_ROUTE, False, {})
    e2e.use(m, cfg)
    assert "forward" not in m.__dict__ and not m.generation_config.disable_compile
    assert m.generation_config.compile_config is cfg and cfg.backend == "mxfp4"
    n = len(backend.last_compile_info)
    with torch.no_grad():
        m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    infos = list(backend.last_compile_info)[n:]
    assert infos and all(i["rewritten"] == 2 for i in infos)  # decode, compiled by our backend
    torch._dynamo.reset()


def test_tie_broken_routers_pick_by_index_at_ties_only():
    """The check's eager reference: transformers' gpt-oss router with exact ties at the top-k
    boundary sent to the lower (or higher) expert index; no tie, same answer as transformers;
    the router class's own forward is back afterwards."""
    pytest.importorskip("transformers")
    import argparse
    from mxfp4_compile.bench import e2e
    m = e2e.build_model(argparse.Namespace(size="tiny", layers=1, prefill=8, new_tokens=4, seed=0),
                        torch.device("cpu"))
    router = m.model.layers[0].mlp.router  # 4 experts, top 2
    cls, plain = type(router), type(router).forward
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=router.bias.dtype))  # 3-way tie
        x = torch.randn(3, router.weight.shape[1], dtype=router.weight.dtype)
        for lower, want in ((True, [1, 2]), (False, [3, 2])):
            with e2e.tie_broken_routers(m, lower) as ties:
                _, w, ids = router(x)
            assert ids.tolist() == [want] * 3 and int(sum(ties)) == 3
            torch.testing.assert_close(w.float(), torch.full((3, 2), 0.5))
        assert cls.forward is plain
        router.bias.copy_(torch.tensor([0.0, 3.0, 1.0, 2.0], dtype=router.bias.dtype))
        with e2e.tie_broken_routers(m) as ties:
            got = router(x)
        for a, b in zip(got, plain(router, x)):
            assert torch.equal(a, b)
        assert int(sum(ties)) == 0


def test_expert_scale_scales_only_the_experts():
    pytest.importorskip("transformers")
    import argparse
    from mxfp4_compile.bench import e2e

    def params(scale):
        m = e2e.build_model(argparse.Namespace(size="tiny", layers=1, prefill=8, new_tokens=4,
                                               seed=0, expert_scale=scale), torch.device("cpu"))
        return dict(m.named_parameters())
    one, half = params(1.0), params(0.5)
    for name, p in one.items():
        want = p * 0.5 if ".mlp.experts." in name else p
        assert torch.equal(half[name], want), name
    assert any(".mlp.experts." in n for n in one)


def test_compare_greedy_uses_only_steps_with_equal_inputs():
    from types import SimpleNamespace
    from mxfp4_compile.bench.e2e import compare_greedy

    def out(tokens, logits):
        return SimpleNamespace(sequences=torch.tensor([[9, 9] + tokens]),
                               logits=tuple(torch.tensor([row]) for row in logits))
    eager = out([0, 1, 2], [[5.0, 1.0, 0.0], [0.0, 3.0, 2.0], [0.0, 0.0, 1.0]])
    same = out([0, 1, 2], [[5.0, 1.0, 0.0], [0.0, 3.0, 2.0], [0.0, 0.0, 1.0]])
    r = compare_greedy(eager, same, margin=0.5)
    assert r["first_diff"] is None and r["tokens_compared"] == 3 and r["logits_rel_l2"] == 0
    # step 1 flips (eager margin 1.0, |dlogit| 0.6 on both tokens); step 2's logits (other
    # inputs) must not count
    flip = out([0, 2, 0], [[5.0, 1.0, 0.0], [0.0, 2.4, 2.6], [100.0, 0.0, 0.0]])
    r = compare_greedy(eager, flip, margin=0.5)
    assert r["first_diff"] == 1 and r["margin_at_diff"] == 1.0
    assert abs(r["dlogit_at_diff"] - 0.6) < 1e-6
    want = torch.tensor([[0.0, 0, 0], [0, 0.6, 0.6]]).norm() / torch.tensor([[5.0, 1, 0], [0, 3, 2]]).norm()
    assert abs(r["logits_rel_l2"] - float(want)) < 1e-6
    assert compare_greedy(eager, flip, margin=2.0)["tokens_compared"] == 1  # step 1 is a near-tie


def test_op_progress_steps_only_for_kernels_that_run(tmp_path, capsys):
    assert bench.main(["op", "--out", str(tmp_path), "--models", "tiny", "--tokens", "1",
                       "--min-replays", "2", "--replay-s", "0.005", "--r-sets", "2"]) == 0
    steps = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[op ")]
    assert steps and all(ln.split("] ", 1)[1].strip() for ln in steps), steps  # no blank steps
    assert steps[-1].startswith(f"[op {len(steps)}/{len(steps)}]")


@pytest.mark.slow
def test_checkpoint_tiny(tmp_path, capsys):
    """Writes a tiny gpt-oss checkpoint in OpenAI's layout, loads it with from_pretrained,
    compiles, runs: the JSON row has the memory and agreement fields."""
    pytest.importorskip("transformers")
    import json
    assert bench.main(["checkpoint", "--out", str(tmp_path), "--dir", str(tmp_path / "ck"),
                       "--generate", "2"]) == 0
    row = json.loads((tmp_path / "checkpoint_tiny.json").read_text())
    assert row["kernel"] == "reference" and row["already_mxfp4_layers"] == 2
    assert row["routers"] and all(r.startswith("topk_softmax") for r in row["routers"])
    assert row["rel_l2_compiled_vs_eager"] < 5e-2 and row["generate_mxfp4_new_tokens"] == 2
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert any(k.endswith("mlp.experts.gate_up_proj_blocks") for k in index["weight_map"])


def test_help_explains_every_flag(capsys):
    for cmd in ("op", "e2e", "checkpoint", "plot"):
        with pytest.raises(SystemExit):
            bench.main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "--out" in text and "show this help" in text
