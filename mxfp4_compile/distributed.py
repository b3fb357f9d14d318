"""Expert parallelism (EP) and tensor parallelism (TP) for the MXFP4 MoE op on torch.distributed.

Every rank sees the same tokens; it runs the fused op on the weights it holds, and one all-reduce
(sum) over the group adds the partial outputs up:

  EP  rank r holds whole experts (contiguous blocks, as vLLM's expert_map): the op takes the
      global -> local ``expert_map`` (-1 = elsewhere), tokens routed to other ranks' experts
      contribute zero here. Each expert's w2 bias lives with its expert, so the sum is exact.
  TP  rank r holds every expert's slice [lo_r, hi_r) of the intermediate dim I: w13 column-parallel
      (gate/up pairs kept together, for either activation's row order), w2 row-parallel. Each rank
      quantizes its own slice, padded to its kernel's I multiple (I=2880 over 4 ranks = 720 per
      rank -> 736 (reference) / 768 (triton)): the MX blocks follow the shard. The w2 bias is added
      on rank 0 only, so the sum over ranks adds it exactly once.

The op combines (weighted sum over the k slots) before the all-reduce: [T, H] on the wire, k times
less than reducing the uncombined [T, k, H] as OpenAI's gpt-oss reference MLPBlock does.

Shape legend: E global experts, E_r experts on rank r, H hidden, I intermediate, T tokens, k top-k.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import formats
from .formats import SWIGLU_ALPHA, SWIGLU_LIMIT, Activation, Kernel, Rounding, check_activation
from .ops.dispatch import choose_kernel
from .ops.weights import PreparedMoE, check_expert_shapes, prepare_moe_weights

__all__ = ["ShardedMoE", "check_expert_map", "check_expert_maps", "check_expert_parallel",
           "expert_map_for_rank", "expert_range",
           "intermediate_range", "shard_experts", "shard_intermediate"]


# ----------------------------------------------------------------------------------- partitions


def _split(n: int, rank: int, world: int, what: str) -> tuple[int, int]:
    """Contiguous block [lo, hi) of rank among world; the first n % world ranks get one more."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, world={world}), got rank={rank}")
    if n < world:
        raise ValueError(f"cannot split {n} {what} over {world} ranks: every rank needs at least one")
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def expert_range(num_experts: int, rank: int, world: int) -> tuple[int, int]:
    """Global ids [lo, hi) of the experts rank holds under EP."""
    return _split(num_experts, rank, world, "experts")


def intermediate_range(intermediate_size: int, rank: int, world: int) -> tuple[int, int]:
    """Intermediate columns [lo, hi) rank holds under TP."""
    return _split(intermediate_size, rank, world, "intermediate columns")


def expert_map_for_rank(num_experts: int, rank: int, world: int, device=None) -> torch.Tensor:
    """int32 [E]: global expert id -> local id on ``rank`` (contiguous blocks), -1 elsewhere."""
    lo, hi = expert_range(num_experts, rank, world)
    m = torch.full((num_experts,), -1, dtype=torch.int32)
    m[lo:hi] = torch.arange(hi - lo, dtype=torch.int32)
    return m.to(device) if device is not None else m


def check_expert_map(expert_map: torch.Tensor, num_experts: int, num_local: int | None = None) -> None:
    """Raise ValueError unless ``expert_map`` is a 1-D int map of length ``num_experts`` whose
    entries are -1 or distinct local ids in [0, num_local). Reads the map on the host: call it
    while building the layer, not per step."""
    if not isinstance(expert_map, torch.Tensor) or expert_map.dim() != 1 \
            or expert_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_map must be a 1-D int32 tensor [E_global] (global id -> local id "
                         f"or -1), got {getattr(expert_map, 'dtype', type(expert_map))} "
                         f"{tuple(getattr(expert_map, 'shape', ()))}")
    if expert_map.shape[0] != num_experts:
        raise ValueError(f"expert_map has {expert_map.shape[0]} entries but the model has "
                         f"{num_experts} global experts: one entry per global expert is needed")
    m = expert_map.detach().cpu().long()
    bad = m[(m < -1) | ((m >= num_local) if num_local is not None else torch.zeros_like(m, dtype=torch.bool))]
    if bad.numel():
        raise ValueError(f"expert_map entries must be -1 (not on this rank) or a local expert id in "
                         f"[0, {num_local}); got {sorted(set(bad.tolist()))}"
                         + (f" but this rank holds only {num_local} experts" if num_local is not None else ""))
    local = m[m >= 0]
    uniq, counts = local.unique(return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1].tolist()
        owners = {d: (m == d).nonzero().flatten().tolist() for d in dup}
        raise ValueError(f"expert_map sends several global experts to one local expert: "
                         + ", ".join(f"local {d} <- global {g}" for d, g in owners.items()))
    if num_local is not None and uniq.numel() != num_local:
        missing = sorted(set(range(num_local)) - set(uniq.tolist()))
        raise ValueError(f"expert_map never uses local experts {missing} of the {num_local} this "
                         f"rank holds (weights and map disagree)")


def _ids(xs, most: int = 16) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= most else f"{xs[:most]}... ({len(xs)} in all)"


def check_expert_maps(maps, num_experts: int) -> None:
    """Raise ValueError unless the ranks' maps (``maps[r]`` = rank r's int [E] map, -1 = not
    here) give every global expert to exactly one rank: an expert on two ranks would be added
    twice by the all-reduce, an expert on none would give its tokens zero output."""
    owners: dict[int, list[int]] = {e: [] for e in range(num_experts)}
    for r, m in enumerate(maps):
        if len(m) != num_experts:
            raise ValueError(f"rank {r}'s expert_map has {len(m)} entries but the model has "
                             f"{num_experts} global experts")
        for e in (torch.as_tensor(m).detach().cpu().long() >= 0).nonzero().flatten().tolist():
            owners[e].append(r)
    world = len(maps)
    dup = {e: rs for e, rs in owners.items() if len(rs) > 1}
    if dup:
        shown = list(dup.items())[:16]
        raise ValueError(
            "expert-parallel maps overlap: " + ", ".join(f"expert {e} is held by ranks {rs}"
                                                         for e, rs in shown)
            + (f" ... ({len(dup)} experts in all)" if len(dup) > len(shown) else "")
            + f"; each of the {num_experts} global experts must live on exactly one of the "
            f"{world} ranks, or the all-reduce adds its output once per holder. Give the ranks "
            f"disjoint maps (the default, expert_map_for_rank(E, rank, world), is).")
    missing = [e for e, rs in owners.items() if not rs]
    if missing:
        raise ValueError(
            f"expert-parallel maps leave experts {_ids(missing)} on no rank (of {world}): "
            f"tokens routed to them would silently get zero output. Every one of the "
            f"{num_experts} global experts must be held by exactly one rank (the default maps, "
            f"expert_map_for_rank(E, rank, world), cover all).")


def _local_map_error(expert_map, num_experts: int, rank: int) -> str | None:
    try:
        check_expert_map(expert_map, num_experts)
    except ValueError as e:
        return str(e)
    if not bool((expert_map >= 0).any()):
        return f"rank {rank}: expert_map gives this rank no experts"
    return None


def check_expert_parallel(expert_map: torch.Tensor, num_experts: int, *, group=None,
                          rank: int | None = None, world: int | None = None,
                          _local_error: str | None = None) -> None:
    """Set-up check of expert parallelism: this rank's map, and, when torch.distributed is
    initialised, every rank's map at once (ONE all_gather_object over ``group``, the default
    group if None; every rank of the group must call it): refuses an expert on several ranks or
    on none, a ``world``/``rank`` that disagrees with the group, ranks that disagree on E, and a
    bad map on any rank (every rank raises, none is left waiting). Without a process group only
    the local map is checked."""
    if not (dist.is_available() and dist.is_initialized()):
        err = _local_map_error(expert_map, num_experts, 0 if rank is None else rank)
        if err:
            raise ValueError(err)
        return
    g_rank, g_world = dist.get_rank(group), dist.get_world_size(group)
    rank = g_rank if rank is None else rank
    world = g_world if world is None else world
    err = _local_error or _local_map_error(expert_map, num_experts, rank)
    mine = dict(rank=rank, world=world, E=num_experts, err=err,
                map=None if err else expert_map.detach().cpu().long().tolist())
    every: list = [None] * g_world
    dist.all_gather_object(every, mine, group=group)  # position = the rank in the group
    worlds = {r: m["world"] for r, m in enumerate(every) if m["world"] != g_world}
    if worlds:
        ws = sorted(set(worlds.values()))
        raise ValueError(
            f"world={ws[0] if len(ws) == 1 else ws} was passed (on group rank(s) "
            f"{sorted(worlds)}) but the process group has {g_world} ranks: maps built for another "
            f"world size drop or double experts. Leave world out (it is taken from the group) or "
            f"pass dist.get_world_size(group).")
    ranks = {r: m["rank"] for r, m in enumerate(every) if m["rank"] != r}
    if ranks:
        raise ValueError(
            "rank argument disagrees with the process group: "
            + ", ".join(f"group rank {r} passed rank={v}" for r, v in ranks.items())
            + ". Leave rank out (it is taken from the group) or pass dist.get_rank(group).")
    if err:
        raise ValueError(err)
    bad = {r: m["err"] for r, m in enumerate(every) if m["err"]}
    if bad:
        raise ValueError("expert parallelism refused on other rank(s): "
                         + "; ".join(f"rank {r}: {e}" for r, e in bad.items()))
    es = {r: m["E"] for r, m in enumerate(every)}
    if len(set(es.values())) > 1:
        raise ValueError(f"ranks disagree on the number of global experts (rank: E) {es}: every "
                         f"rank must be given the same full expert weights")
    check_expert_maps([torch.tensor(m["map"]) for m in every], num_experts)


def _check_group_rank_world(group, rank: int, world: int) -> None:
    """Local check (no collective): an explicit rank/world must match an initialised group."""
    if dist.is_available() and dist.is_initialized():
        g_rank, g_world = dist.get_rank(group), dist.get_world_size(group)
        if world != g_world:
            raise ValueError(f"world={world} was passed but the process group has {g_world} ranks: "
                             f"shards built for another world size drop or double part of the "
                             f"layer. Leave world out or pass dist.get_world_size(group).")
        if rank != g_rank:
            raise ValueError(f"rank={rank} was passed on group rank {g_rank}: leave rank out or "
                             f"pass dist.get_rank(group).")


# ------------------------------------------------------------------------------------- slicing


def _as_nk(w13, w2, transposed):
    """[E, K, N] inputs (x @ w) -> [E, N, K] views."""
    return (w13.transpose(1, 2), w2.transpose(1, 2)) if transposed else (w13, w2)


def shard_experts(w13, w2, w13_bias=None, w2_bias=None, *, expert_map: torch.Tensor):
    """The experts ``expert_map`` sends to this rank, in local-id order (views where possible).
    Works for either weight orientation: experts are dim 0."""
    check_expert_map(expert_map, w13.shape[0])
    m = expert_map.detach().cpu().long()
    glob = torch.empty(int((m >= 0).sum()), dtype=torch.long)
    glob[m[m >= 0]] = (m >= 0).nonzero().flatten()  # local id -> global id
    idx = glob.to(w13.device)
    take = (lambda t: None if t is None else t.index_select(0, idx.to(t.device)))
    return take(w13), take(w2), take(w13_bias), take(w2_bias)


def _rows_of_shard(two_i: int, lo: int, hi: int, interleaved: bool, device) -> torch.Tensor:
    """Row indices of w13 [2I, ...] holding gate/up columns [lo, hi), in the input's own order."""
    if interleaved:  # [g0, u0, g1, u1, ...]
        return torch.arange(2 * lo, 2 * hi, device=device)
    i = two_i // 2  # [g0..g(I-1), u0..u(I-1)]
    return torch.cat((torch.arange(lo, hi, device=device), torch.arange(i + lo, i + hi, device=device)))


def shard_intermediate(w13, w2, w13_bias=None, w2_bias=None, *, rank: int, world: int,
                       gate_up_interleaved: bool, transposed: bool = False, bias_rank: int = 0):
    """TP slice of every expert for ``rank``: w13 rows (gate/up pairs of columns [lo, hi) of I, in
    the input's order: ``gate_up_interleaved``), w13_bias alike, w2 columns [lo, hi); w2_bias is
    returned on ``bias_rank`` only (None elsewhere), so summing the ranks' outputs adds it once.
    Returns tensors in the inputs' orientation (``transposed``: [E, K, N])."""
    a13, a2 = _as_nk(w13, w2, transposed)
    _, _, I = check_expert_shapes(a13.shape, a2.shape, False)
    lo, hi = intermediate_range(I, rank, world)
    rows = _rows_of_shard(2 * I, lo, hi, gate_up_interleaved, w13.device)
    s13 = a13.index_select(1, rows)
    s2 = a2[:, :, lo:hi]
    if transposed:
        s13, s2 = s13.transpose(1, 2), s2.transpose(1, 2)
    b13 = None if w13_bias is None else w13_bias.index_select(1, rows.to(w13_bias.device))
    b2 = w2_bias if rank == bias_rank else None
    return s13.contiguous(), s2.contiguous(), b13, b2


# ---------------------------------------------------------------------------------------- module


def _group_rank_world(group, rank, world):
    if rank is None or world is None:
        if not dist.is_available() or not dist.is_initialized():
            if rank is None and world is None:
                return 0, 1
            raise ValueError("give both rank and world, or initialise torch.distributed")
        rank = dist.get_rank(group) if rank is None else rank
        world = dist.get_world_size(group) if world is None else world
    return rank, world


class ShardedMoE(torch.nn.Module):
    """One rank's share of an MoE layer: the fused MXFP4 op on local weights + one all-reduce.

    Build with ``ShardedMoE.expert_parallel(...)`` or ``ShardedMoE.tensor_parallel(...)`` from the
    full float weights (each rank quantizes only what it holds), or directly from a PreparedMoE.
    ``forward(hidden [T, H], topk_ids [T, k] global ids, topk_weights [T, k]) -> [T, H]``, the same
    on every rank. Routing stays with the caller (any router), identical on every rank."""

    def __init__(self, prepared: PreparedMoE, *, expert_map: torch.Tensor | None = None,
                 group=None, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT,
                 mode: str = "ep", check_ranks: bool = True):
        super().__init__()
        if expert_map is not None:
            if check_ranks:  # every rank of the group must build its module together
                check_expert_parallel(expert_map, expert_map.shape[0], group=group)
            check_expert_map(expert_map, expert_map.shape[0], prepared.w13.shape[0])  # dim 0 = E
        self.prepared = prepared
        self.group = group
        self.alpha, self.limit, self.mode = alpha, limit, mode
        self.register_buffer("expert_map", None if expert_map is None
                             else expert_map.to(torch.int32), persistent=False)
        for role, t in zip(("w13", "w13_scales", "w13_bias", "w2", "w2_scales", "w2_bias"),
                           prepared.tensors()):
            self.register_buffer(role, t, persistent=False)

    # -- construction from full float weights --------------------------------------------------
    @staticmethod
    def _setup(device, kernel, group, rank, world):
        rank, world = _group_rank_world(group, rank, world)
        device = torch.device(device)
        name, _ = choose_kernel(device, kernel)
        return rank, world, device, name

    @classmethod
    def expert_parallel(cls, w13, w2, w13_bias=None, w2_bias=None, *, activation: Activation,
                        device="cpu", kernel: Kernel = "auto", rounding: Rounding = "floor",
                        gate_up_interleaved: bool | None = None, transposed: bool = False,
                        expert_map: torch.Tensor | None = None, group=None,
                        rank: int | None = None, world: int | None = None,
                        alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> ShardedMoE:
        """Full weights [E, 2I, H] / [E, H, I] (or transposed) -> this rank's experts, quantized.
        ``expert_map`` defaults to contiguous blocks (``expert_map_for_rank``). With a process
        group, every rank's map is checked at once (``check_expert_parallel``: one collective, so
        every rank of ``group`` must call this together)."""
        rank, world, device, kernel = cls._setup(device, kernel, group, rank, world)
        E, local_error = w13.shape[0], None
        if expert_map is None:
            try:
                expert_map = expert_map_for_rank(E, rank, world)
            except ValueError as e:
                if not (dist.is_available() and dist.is_initialized()):
                    raise
                # still join the collective (the other ranks wait in it), which raises on all
                expert_map, local_error = torch.full((E,), -1, dtype=torch.int32), str(e)
        check_expert_parallel(expert_map, E, group=group, rank=rank, world=world,
                              _local_error=local_error)
        parts = shard_experts(w13, w2, w13_bias, w2_bias, expert_map=expert_map)
        parts = [None if t is None else t.to(device) for t in parts]
        prepared = prepare_moe_weights(parts[0], parts[1], parts[2], parts[3], activation=activation,
                                       kernel=kernel, rounding=rounding,
                                       gate_up_interleaved=gate_up_interleaved,
                                       transposed=transposed, cache=False)
        return cls(prepared, expert_map=expert_map.to(device), group=group, alpha=alpha,
                   limit=limit, mode="ep", check_ranks=False)

    @classmethod
    def tensor_parallel(cls, w13, w2, w13_bias=None, w2_bias=None, *, activation: Activation,
                        device="cpu", kernel: Kernel = "auto", rounding: Rounding = "floor",
                        gate_up_interleaved: bool | None = None, transposed: bool = False,
                        group=None, rank: int | None = None, world: int | None = None,
                        alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> ShardedMoE:
        """Full weights -> this rank's slice of I for every expert, quantized (blocks follow the
        shard, I/world padded to the kernel's multiple); w2 bias kept on rank 0 only."""
        rank, world, device, kernel = cls._setup(device, kernel, group, rank, world)
        _check_group_rank_world(group, rank, world)
        check_activation(activation)
        if gate_up_interleaved is None:
            gate_up_interleaved = formats.gate_up_interleaved(activation)
        parts = shard_intermediate(w13, w2, w13_bias, w2_bias, rank=rank, world=world,
                                   gate_up_interleaved=gate_up_interleaved, transposed=transposed)
        parts = [None if t is None else t.to(device) for t in parts]
        prepared = prepare_moe_weights(parts[0], parts[1], parts[2], parts[3], activation=activation,
                                       kernel=kernel, rounding=rounding,
                                       gate_up_interleaved=gate_up_interleaved,
                                       transposed=transposed, cache=False)
        return cls(prepared, group=group, alpha=alpha, limit=limit, mode="tp")

    # -- forward -------------------------------------------------------------------------------
    def local(self, hidden, topk_ids, topk_weights, combine: bool = True) -> torch.Tensor:
        """This rank's partial output, before the all-reduce."""
        p = self.prepared
        return torch.ops.mxfp4.moe(hidden, topk_ids, topk_weights, self.w13, self.w13_scales,
                                   self.w13_bias, self.w2, self.w2_scales, self.w2_bias, p.kernel,
                                   activation=p.activation, alpha=self.alpha, limit=self.limit,
                                   expert_map=self.expert_map, combine=combine)

    def forward(self, hidden, topk_ids, topk_weights) -> torch.Tensor:
        out = self.local(hidden, topk_ids, topk_weights)  # [T, H]: combine, then reduce
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out
