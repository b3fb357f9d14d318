"""Expert and tensor parallelism across 2 and 4 processes (torch.distributed).

One spawn per world size runs every scenario on every rank and writes what failed; the tests below
read those reports. Backend from the device: NCCL on cuda:rank when at least ``world`` GPUs are
visible, else gloo on CPU, so this file runs unchanged on a multi-GPU host.

Oracles (computed in each worker, single-process, no collectives):
  EP  the fused op on the full (unsharded) prepared weights;
  TP  every rank's shard prepared the same way (slice, pad I/world, quantize: the MX blocks follow
      the shard), dequantized, unpadded, put back together and run through plain float math; and,
      with weights exactly representable in MXFP4 (so any block split is lossless), the fused op on
      the unsharded weights.
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mxfp4_compile  # noqa: F401  (registers torch.ops.mxfp4)
from mxfp4_compile import distributed as D
from mxfp4_compile import numerics
from mxfp4_compile.ops.moe_torch import activate
from mxfp4_compile.ops.weights import prepare_moe_weights

WORLDS = (2, 4)


# MXFP4_TEST_SHARE_GPU=1: ranks share the visible GPUs (cuda:rank % count) over gloo, which
# all-reduces CUDA tensors through the host: runs the GPU kernels on shards with one GPU.
SHARE_GPU = os.environ.get("MXFP4_TEST_SHARE_GPU") == "1"


def _use_cuda(world: int) -> bool:
    return torch.cuda.is_available() and (SHARE_GPU or torch.cuda.device_count() >= world)


def _nccl(world: int) -> bool:
    return _use_cuda(world) and torch.cuda.device_count() >= world


# ------------------------------------------------------------------------------------ helpers


def _weights(E, H, I, *, seed, exact=False, bias=True):
    """Float expert weights [E, 2I, H], [E, H, I] (+ biases); ``exact``: values in the e2m1 grid
    times 1/8, which MXFP4 represents exactly whatever the block boundaries."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        lut = numerics.E2M1_VALUES / 8
        w13 = lut[torch.randint(0, 16, (E, 2 * I, H), generator=g)]
        w2 = lut[torch.randint(0, 16, (E, H, I), generator=g)]
    else:
        w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
        w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    b13 = torch.randn(E, 2 * I, generator=g) if bias else None
    b2 = torch.randn(E, H, generator=g) if bias else None
    return w13, w2, b13, b2


def _tokens(T, H, E, k, *, seed, dtype, device, experts=None):
    """hidden [T, H], distinct top-k ids [T, k] (drawn from ``experts``), softmax weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(E) if experts is None else torch.as_tensor(experts)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)]) \
        if T else torch.empty(0, k, dtype=torch.long)
    x = torch.randn(T, H, generator=g)
    w = torch.randn(T, k, generator=g).softmax(-1)
    return x.to(device, dtype), ids.to(device, torch.int32), w.to(device)


def _close(got, want, dtype, what):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = max(want.abs().max().item(), 1.0)
    err = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= tol * scale, f"{what}: max |diff| {err:.3g} > {tol} * {scale:.3g}"


def _single(w13, w2, b13, b2, activation, kernel, device, x, ids, w, gate_up_interleaved=None):
    p = prepare_moe_weights(*(None if t is None else t.to(device) for t in (w13, w2, b13, b2)),
                            activation=activation, kernel=kernel,
                            gate_up_interleaved=gate_up_interleaved, cache=False)
    return torch.ops.mxfp4.moe(x, ids, w, **p.moe_kwargs())


def _shard_oracle(w13, w2, b13, b2, activation, world, x, ids, w, gate_up_interleaved):
    """Per-shard quantization (canonical layout), dequantized and reassembled; float math."""
    inter = gate_up_interleaved
    I = w2.shape[2]
    gates, ups, downs, gb, ub = [], [], [], [], []
    for r in range(world):
        s13, s2, sb13, _ = D.shard_intermediate(w13, w2, b13, b2, rank=r, world=world,
                                                gate_up_interleaved=inter)
        p = prepare_moe_weights(s13, s2, sb13, None, activation=activation, kernel="reference",
                                gate_up_interleaved=inter, cache=False)
        i_r, H = s2.shape[2], w2.shape[1]
        W13 = numerics.dequantize(p.w13, p.w13_scales, torch.float32)[..., :H]  # [E, Ip, 2, H] pairs
        gate, up = W13[:, :i_r, 0], W13[:, :i_r, 1]
        bg, bu = (p.w13_bias[:, :i_r, 0], p.w13_bias[:, :i_r, 1]) if b13 is not None else (None, None)
        gates.append(gate), ups.append(up), gb.append(bg), ub.append(bu)
        downs.append(numerics.dequantize(p.w2, p.w2_scales, torch.float32)[:, :H, :i_r])
    gate, up, down = torch.cat(gates, 1), torch.cat(ups, 1), torch.cat(downs, 2)  # full I again
    assert gate.shape[1] == I and down.shape[2] == I
    if activation == "swiglu_oai":
        W13 = torch.stack((gate, up), 2).flatten(1, 2)
        B13 = torch.stack((torch.cat(gb, 1), torch.cat(ub, 1)), 2).flatten(1, 2) if b13 is not None else None
    else:
        W13 = torch.cat((gate, up), 1)
        B13 = torch.cat((torch.cat(gb, 1), torch.cat(ub, 1)), 1) if b13 is not None else None
    xs, idl = x.float().cpu(), ids.long().cpu()
    h = torch.einsum("tkoh,th->tko", W13[idl], xs)  # [T, k, 2I]
    if B13 is not None:
        h = h + B13[idl]
    y = torch.einsum("tkhi,tki->tkh", down[idl], activate(h, activation, 1.702, 7.0))
    if b2 is not None:
        y = y + b2.float()[idl]
    return (y * w.float().cpu().unsqueeze(-1)).sum(1).to(x.dtype)


# ---------------------------------------------------------------------------------- scenarios


def sc_ep_contiguous(ctx):
    for activation, E, bias in (("swiglu_oai", 8, True), ("silu_glu", 6, False)):  # 6 over 4: 2,2,1,1
        w13, w2, b13, b2 = _weights(E, 64, 64, seed=1, bias=bias)
        x, ids, w = _tokens(9, 64, E, 2, seed=2, dtype=ctx["dtype"], device=ctx["device"])
        m = D.ShardedMoE.expert_parallel(w13, w2, b13, b2, activation=activation, device=ctx["device"])
        assert m.w13.shape[0] == len(range(*D.expert_range(E, ctx["rank"], ctx["world"])))
        want = _single(w13, w2, b13, b2, activation, m.prepared.kernel, ctx["device"], x, ids, w)
        _close(m(x, ids, w), want, ctx["dtype"], f"EP {activation} E={E}")


def sc_ep_round_robin_map(ctx):
    E, rank, world = 8, ctx["rank"], ctx["world"]
    emap = torch.full((E,), -1, dtype=torch.int32)
    mine = torch.arange(rank, E, world)  # expert e on rank e % world, local id e // world
    emap[mine] = torch.arange(len(mine), dtype=torch.int32)
    w13, w2, b13, b2 = _weights(E, 64, 32, seed=3)
    x, ids, w = _tokens(7, 64, E, 3, seed=4, dtype=ctx["dtype"], device=ctx["device"])
    m = D.ShardedMoE.expert_parallel(w13, w2, b13, b2, activation="swiglu_oai", device=ctx["device"],
                                     expert_map=emap)
    want = _single(w13, w2, b13, b2, "swiglu_oai", m.prepared.kernel, ctx["device"], x, ids, w)
    _close(m(x, ids, w), want, ctx["dtype"], "EP round-robin map")


def sc_ep_rank_without_tokens(ctx):
    E = 8
    w13, w2, b13, b2 = _weights(E, 64, 32, seed=5)
    only = list(range(*D.expert_range(E, 0, ctx["world"])))  # every token routed to rank 0's experts
    x, ids, w = _tokens(5, 64, E, 2, seed=6, dtype=ctx["dtype"], device=ctx["device"], experts=only)
    m = D.ShardedMoE.expert_parallel(w13, w2, b13, b2, activation="swiglu_oai", device=ctx["device"])
    local = m.local(x, ids, w)
    if ctx["rank"] != 0:
        assert local.abs().max().item() == 0, "a rank without local tokens must contribute zero"
    want = _single(w13, w2, b13, b2, "swiglu_oai", m.prepared.kernel, ctx["device"], x, ids, w)
    _close(m(x, ids, w), want, ctx["dtype"], "EP, ranks > 0 without tokens")
    x0, ids0, w0 = _tokens(0, 64, E, 2, seed=6, dtype=ctx["dtype"], device=ctx["device"])
    out = m(x0, ids0, w0)
    assert out.shape == (0, 64), f"T=0: got {tuple(out.shape)}"


def _raises(match, build):
    """``build()`` must raise ValueError matching ``match`` (on every rank: a rank left waiting in
    the set-up collective would time the spawn out instead)."""
    import re
    try:
        build()
    except ValueError as e:
        assert re.search(match, str(e)), f"wrong error: {e!r} (want /{match}/)"
        return
    raise AssertionError(f"no ValueError /{match}/")


def sc_ep_cross_rank_checks(ctx):
    """The maps are checked across ranks at set-up (one collective): overlap, gap, wrong world or
    rank, a bad map on one rank only; every rank refuses, and a good build works afterwards."""
    E, rank, world = 8, ctx["rank"], ctx["world"]
    w13, w2, b13, b2 = _weights(E, 64, 32, seed=7)
    build = lambda **kw: D.ShardedMoE.expert_parallel(w13, w2, b13, b2, activation="swiglu_oai",
                                                      device=ctx["device"], **kw)
    lo, hi = D.expert_range(E, rank, world)
    # (a) expert 0 on rank 0 (its block) and on rank 1 too
    emap = D.expert_map_for_rank(E, rank, world)
    if rank == 1:
        emap[0] = hi - lo
    _raises(r"expert 0 is held by ranks \[0, 1\]", lambda: build(expert_map=emap))
    # (b) rank 0 drops the last expert of its block
    emap = D.expert_map_for_rank(E, rank, world)
    if rank == 0:
        emap[hi - 1] = -1
    _raises(rf"experts \[{hi - 1 if rank == 0 else D.expert_range(E, 0, world)[1] - 1}\] on no "
            rf"rank \(of {world}\)", lambda: build(expert_map=emap))
    # (c) world disagreeing with the group: world + 1 (3 on a 2-process group), and 1
    _raises(rf"world={world + 1} was passed .* the process group has {world} ranks",
            lambda: build(rank=rank, world=world + 1))
    _raises(rf"world=1 was passed .* the process group has {world} ranks",
            lambda: build(rank=0, world=1))
    _raises(r"group rank 1 passed rank=0", lambda: build(rank=0, world=world))
    # a bad map on rank 1 only: rank 1 says why, the others name rank 1
    bad = torch.zeros(E, dtype=torch.int32) if rank == 1 else D.expert_map_for_rank(E, rank, world)
    _raises(r"several global experts to one local expert" if rank == 1
            else r"refused on other rank\(s\): rank 1: expert_map sends several",
            lambda: build(expert_map=bad))
    # direct construction from a PreparedMoE checks the maps as well
    emap = D.expert_map_for_rank(E, 0, world)  # every rank claims rank 0's experts
    p = prepare_moe_weights(*D.shard_experts(w13, w2, b13, b2, expert_map=emap),
                            activation="swiglu_oai", kernel="reference", cache=False)
    _raises(r"expert 0 is held by ranks \[0, 1", lambda: D.ShardedMoE(p, expert_map=emap))
    # TP: a world that disagrees with the group is refused too (local check)
    _raises(rf"world={world + 1} was passed but the process group has {world} ranks",
            lambda: D.ShardedMoE.tensor_parallel(w13, w2, activation="swiglu_oai", rank=rank,
                                                 world=world + 1))
    # the collectives stayed in step: a good build still runs and is right
    x, ids, w = _tokens(5, 64, E, 2, seed=8, dtype=ctx["dtype"], device=ctx["device"])
    m = build()
    want = _single(w13, w2, b13, b2, "swiglu_oai", m.prepared.kernel, ctx["device"], x, ids, w)
    _close(m(x, ids, w), want, ctx["dtype"], "EP after refused builds")


def _tp_cases(world):
    # (E, H, I, activation, input gate/up interleaved, bias): I/world = 24 -> 32 or 48 -> 64
    # (padding), and gpt-oss's I=2880 over 4 ranks = 720 per rank (not a multiple of 32).
    cases = [(4, 64, 96, "swiglu_oai", True, True), (4, 64, 96, "silu_glu", False, False),
             (3, 64, 96, "silu_glu", True, True), (3, 64, 96, "swiglu_oai", False, True)]
    if world == 4:
        cases.append((2, 32, 2880, "swiglu_oai", True, True))
    return cases


def sc_tp_per_shard_reference(ctx):
    for i, (E, H, I, activation, inter, bias) in enumerate(_tp_cases(ctx["world"])):
        w13, w2, b13, b2 = _weights(E, H, I, seed=10 + i, bias=bias)
        x, ids, w = _tokens(6, H, E, 2, seed=20 + i, dtype=ctx["dtype"], device=ctx["device"])
        m = D.ShardedMoE.tensor_parallel(w13, w2, b13, b2, activation=activation,
                                         device=ctx["device"], gate_up_interleaved=inter)
        want = _shard_oracle(w13, w2, b13, b2, activation, ctx["world"], x, ids, w, inter)
        _close(m(x, ids, w).cpu(), want, ctx["dtype"], f"TP {activation} I={I} interleaved={inter}")


def sc_tp_exact_equals_unsharded(ctx):
    for i, (E, H, I, activation, inter, bias) in enumerate(_tp_cases(ctx["world"])[:3]):
        w13, w2, b13, b2 = _weights(E, H, I, seed=30 + i, exact=True, bias=bias)
        x, ids, w = _tokens(6, H, E, 2, seed=40 + i, dtype=ctx["dtype"], device=ctx["device"])
        m = D.ShardedMoE.tensor_parallel(w13, w2, b13, b2, activation=activation,
                                         device=ctx["device"], gate_up_interleaved=inter)
        assert (m.w2_bias is not None) == (bias and ctx["rank"] == 0), "w2 bias must sit on rank 0 only"
        want = _single(w13, w2, b13, b2, activation, m.prepared.kernel, ctx["device"], x, ids, w,
                       gate_up_interleaved=inter)
        _close(m(x, ids, w), want, ctx["dtype"], f"TP exact {activation} I={I}")


class Skip(Exception):
    pass


def _gpt_oss_tp_block(intermediate, rank, world):
    """OpenAI's reference MLPBlock built under an initialised process group (world_size = world),
    loaded with this rank's rows/columns of one full random block, as gpt-oss's checkpoint loader
    slices them (mlp1 rows interleaved gate/up: a contiguous row range keeps the pairs)."""
    try:
        from gpt_oss.torch import model as M
    except ImportError as e:
        raise Skip(f"gpt_oss not installed: {e}")
    cfg = M.ModelConfig(num_experts=4, experts_per_token=2, hidden_size=64,
                        intermediate_size=intermediate)
    m = M.MLPBlock(cfg)
    assert m.world_size == world
    g = torch.Generator().manual_seed(0)
    E, H, I = 4, 64, intermediate
    shapes = {"norm.scale": (H,), "gate.weight": (E, H), "gate.bias": (E,), "mlp1_weight": (E, 2 * I, H),
              "mlp1_bias": (E, 2 * I), "mlp2_weight": (E, H, I), "mlp2_bias": (E, H)}  # unsharded
    full = {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes.items()}
    full["norm.scale"] = torch.ones(64)
    i = intermediate // world
    full["mlp1_weight"] = full["mlp1_weight"][:, 2 * i * rank:2 * i * (rank + 1)]
    full["mlp1_bias"] = full["mlp1_bias"][:, 2 * i * rank:2 * i * (rank + 1)]
    full["mlp2_weight"] = full["mlp2_weight"][:, :, i * rank:i * (rank + 1)]
    m.load_state_dict(full)
    return m.to(torch.bfloat16).eval()


def _qdq_(m):
    """This rank's expert weights -> their MXFP4 round trip, blocks along K = the shard's own I
    (zero-padded to a multiple of 32, as the weight transform pads)."""
    with torch.no_grad():
        for name in ("mlp1_weight", "mlp2_weight"):
            p = getattr(m, name)
            k = p.shape[-1]
            padded = torch.nn.functional.pad(p.float(), (0, -k % 32))
            rt = torch.ops.mxfp4.dequantize(*torch.ops.mxfp4.quantize(padded), torch.float32)
            p.copy_(rt[..., :k])
    return m


def _compile(m, x):
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    with torch.no_grad():
        cm = torch.compile(m, backend="mxfp4")
        out, code = run_and_get_code(lambda: cm(x))
    return out, "\n".join(code)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _check_compiled_tp(ctx, intermediate):
    import copy
    if ctx["world"] != 2:
        raise Skip("compiled at 2 ranks only (time)")
    m = _gpt_oss_tp_block(intermediate, ctx["rank"], ctx["world"])
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    if ctx["device"].type == "cuda":
        m, x = m.to(ctx["device"]), x.to(ctx["device"])
    with torch.no_grad():
        ref = m(x)
        ref_q = _qdq_(copy.deepcopy(m))(x)
    out, code = _compile(m, x)
    assert code.count("torch.ops.mxfp4.moe.default(") == 1, "the TP MoE was not rewritten"
    calls = [l for l in code.splitlines() if "_c10d_functional.all_reduce" in l and "(" in l
             and not l.lstrip().startswith("#")]
    assert len(calls) == 1, f"want one all-reduce, got {calls}"
    assert _rel(out, ref_q) < 2e-2, (_rel(out, ref_q), _rel(ref_q, ref))
    assert _rel(out, ref) < 1.25 * _rel(ref_q, ref) + 2e-2


def sc_tp_compiled_gpt_oss_block(ctx):
    """torch.compile of the reference MLPBlock under TP (I per rank 64): the op on the rank's
    shard, ONE all-reduce of [T, H] after the combine (not of [T, k, H]), w2 bias once; equals the
    eager block with the same per-rank MXFP4 weights. At 2 ranks only: compiling is most of this
    file's time."""
    _check_compiled_tp(ctx, 128)


def sc_tp_compiled_padded_shard(ctx):
    """The same with I per rank 24 (48 over 2), not a multiple of 32: the transform zero-pads the
    shard (blocks follow it), as for gpt-oss's 2880 over 4 = 720 per rank."""
    _check_compiled_tp(ctx, 48)


SCENARIOS = {f.__name__[3:]: f for f in (sc_ep_contiguous, sc_ep_round_robin_map,
                                         sc_ep_rank_without_tokens, sc_ep_cross_rank_checks,
                                         sc_tp_per_shard_reference,
                                         sc_tp_exact_equals_unsharded, sc_tp_compiled_gpt_oss_block,
                                         sc_tp_compiled_padded_shard)}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    cuda = _use_cuda(world)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if _nccl(world) else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    ctx = dict(rank=rank, world=world, device=device,
               dtype=torch.bfloat16 if cuda else torch.float32)
    report, times = {}, {}
    try:
        for name, fn in SCENARIOS.items():
            t0 = time.perf_counter()
            try:
                fn(ctx)
                report[name] = None
            except Skip as e:
                report[name] = f"SKIP: {e}"
            except Exception:
                report[name] = traceback.format_exc()
            times[name] = round(time.perf_counter() - t0, 1)
            dist.barrier()
        report["_backend"] = dist.get_backend()
        report["_seconds"] = times
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            d = tmp_path_factory.mktemp(f"world{world}")
            mp.spawn(_worker, args=(world, str(d / "rendezvous"), str(d)), nprocs=world, join=True)
            cache[world] = [json.load(open(d / f"rank{r}.json")) for r in range(world)]
        return cache[world]
    return get


@pytest.mark.slow        # one spawn of 2 and one of 4 processes runs every scenario (tens of s)
@pytest.mark.subprocess
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("world", WORLDS)
def test_sharded(reports, world, scenario):
    reps = reports(world)
    assert reps[0]["_backend"] == ("nccl" if _nccl(world) else "gloo")
    if all(str(rep.get(scenario)).startswith("SKIP: ") for rep in reps):
        pytest.skip(reps[0][scenario][6:])
    failed = {r: rep[scenario] for r, rep in enumerate(reps) if rep.get(scenario)}
    assert not failed, "\n".join(f"rank {r}:\n{tb}" for r, tb in failed.items())


# ------------------------------------------------------------- single-process: maps and slicing


def test_expert_map_for_rank():
    assert D.expert_map_for_rank(8, 1, 4).tolist() == [-1, -1, 0, 1, -1, -1, -1, -1]
    assert D.expert_map_for_rank(6, 3, 4).tolist() == [-1, -1, -1, -1, -1, 0]  # 2, 2, 1, 1
    held = sum((D.expert_map_for_rank(6, r, 4) >= 0).int() for r in range(4))
    assert held.tolist() == [1] * 6
    assert D.expert_map_for_rank(8, 0, 2).dtype == torch.int32
    with pytest.raises(ValueError, match="rank must lie"):
        D.expert_map_for_rank(8, 4, 4)
    with pytest.raises(ValueError, match="every rank needs at least one"):
        D.expert_map_for_rank(2, 0, 4)


@pytest.mark.parametrize("bad, num_local, match", [
    (torch.tensor([0, 1, -1], dtype=torch.int32), 2, "3 entries but the model has 4 global experts"),
    (torch.tensor([0, 1, 2, -1], dtype=torch.int32), 2, r"local expert id in \[0, 2\); got \[2\]"),
    (torch.tensor([0, -2, 1, -1], dtype=torch.int32), 2, r"got \[-2\]"),
    (torch.tensor([0, 1, 0, -1], dtype=torch.int32), 2, "local 0 <- global \\[0, 2\\]"),
    (torch.tensor([0, -1, -1, -1], dtype=torch.int32), 2, r"never uses local experts \[1\]"),
    (torch.tensor([0., 1., -1., -1.]), 2, "1-D int32 tensor"),
])
def test_bad_expert_map(bad, num_local, match):
    with pytest.raises(ValueError, match=match):
        D.check_expert_map(bad, 4, num_local)


def test_bad_map_errors_at_build_and_in_op():
    w13, w2, b13, b2 = _weights(4, 64, 32, seed=0)
    with pytest.raises(ValueError, match="5 entries but the model has 4"):
        D.ShardedMoE.expert_parallel(w13, w2, activation="swiglu_oai", rank=0, world=2,
                                     expert_map=torch.tensor([0, 1, -1, -1, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="several global experts to one local expert"):
        D.ShardedMoE.expert_parallel(w13, w2, activation="swiglu_oai", rank=0, world=2,
                                     expert_map=torch.tensor([0, 0, -1, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="no experts"):
        D.ShardedMoE.expert_parallel(w13, w2, activation="swiglu_oai", rank=0, world=2,
                                     expert_map=torch.full((4,), -1, dtype=torch.int32))
    # the op itself: a map pointing past the experts this rank holds
    m = D.ShardedMoE.expert_parallel(w13, w2, b13, b2, activation="swiglu_oai", rank=0, world=2)
    x, ids, w = _tokens(3, 64, 4, 2, seed=1, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="holds 2 experts"):
        torch.ops.mxfp4.moe(x, ids, w, **m.prepared.moe_kwargs(),
                            expert_map=torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="give both rank and world"):
        D.ShardedMoE.tensor_parallel(w13, w2, activation="swiglu_oai", rank=0)


@pytest.mark.parametrize("maps, match", [
    ([[0, 1, -1, -1], [-1, 0, 0, 1]], r"expert 1 is held by ranks \[0, 1\]"),
    ([[0, 1, -1, -1], [-1, -1, 0, -1]], r"experts \[3\] on no rank \(of 2\)"),
    ([[0, 1, -1, -1], [-1, -1, 0]], "rank 1's expert_map has 3 entries"),
])
def test_check_expert_maps_across_ranks(maps, match):
    with pytest.raises(ValueError, match=match):
        D.check_expert_maps([torch.tensor(m, dtype=torch.int32) for m in maps], 4)
    D.check_expert_maps([D.expert_map_for_rank(6, r, 4) for r in range(4)], 6)  # the default covers


@pytest.mark.parametrize("interleaved", [True, False])
def test_shard_intermediate_keeps_gate_up_pairs(interleaved):
    E, H, I, world = 2, 32, 12, 4  # 3 columns per rank
    col = torch.arange(I, dtype=torch.float32)
    gate, up = col + 1000, col + 2000  # row value says which column and which half
    rows = torch.stack((gate, up), 1).flatten() if interleaved else torch.cat((gate, up))
    w13 = rows[None, :, None].expand(E, 2 * I, H).contiguous()
    w2 = col[None, None, :].expand(E, H, I).contiguous()
    b2 = torch.ones(E, H)
    for r in range(world):
        s13, s2, sb13, sb2 = D.shard_intermediate(w13, w2, rows[None].expand(E, -1), b2, rank=r,
                                                  world=world, gate_up_interleaved=interleaved)
        mine = col[3 * r:3 * r + 3]
        want = torch.stack((mine + 1000, mine + 2000), 1).flatten() if interleaved \
            else torch.cat((mine + 1000, mine + 2000))
        assert s13[0, :, 0].tolist() == want.tolist()
        assert sb13[0].tolist() == want.tolist()
        assert s2[0, 0].tolist() == mine.tolist()
        assert (sb2 is not None) == (r == 0)
    t13, t2, _, _ = D.shard_intermediate(w13.transpose(1, 2), w2.transpose(1, 2), rank=1, world=world,
                                         gate_up_interleaved=interleaved, transposed=True)
    s13, s2, _, _ = D.shard_intermediate(w13, w2, rank=1, world=world, gate_up_interleaved=interleaved)
    assert torch.equal(t13, s13.transpose(1, 2)) and torch.equal(t2, s2.transpose(1, 2))


def test_tp_pads_per_rank_intermediate():
    w13, w2, b13, b2 = _weights(2, 32, 2880, seed=0)
    m = D.ShardedMoE.tensor_parallel(w13, w2, b13, b2, activation="swiglu_oai", rank=3, world=4,
                                     kernel="reference")
    assert m.prepared.intermediate_size == 720
    assert tuple(m.w2.shape) == (2, 32, 736 // 2) and tuple(m.w13.shape) == (2, 736, 2, 16)
    assert m.w2_bias is None
