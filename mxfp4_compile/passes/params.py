"""Frozen parameters in the graph: the nodes Inductor's freeze() constant-folds (the expert weights
must be among them), and a parameter's source name for reports."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .fx_utils import strip


def constant_nodes(graph: fx.Graph, n_params: int) -> set:
    """Nodes computed from frozen parameters only (what Inductor's freeze will constant-fold)."""
    const, seen_ph = set(), 0
    for n in graph.nodes:
        if n.op == "placeholder":
            if seen_ph < n_params:
                const.add(n)
            seen_ph += 1
        elif n.op == "get_attr":
            const.add(n)
        elif n.op == "call_function":
            ins = n.all_input_nodes
            if all(i in const for i in ins) and not _is_random(n) and \
                    (ins or not _reads_symbols(n)):  # factory ops (a LUT built in forward) too
                const.add(n)
    return const


def _reads_symbols(n) -> bool:
    return any(isinstance(a, torch.SymInt) for a in pytree.tree_leaves((n.args, n.kwargs)))


def _is_random(n) -> bool:
    tags = getattr(n.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def param_name(n, names: list | None):
    """Source name of a parameter placeholder (for reports)."""
    root = strip(n)[-1]
    if names and root.op == "placeholder":
        phs = [p for p in root.graph.nodes if p.op == "placeholder"]
        i = phs.index(root)
        if i < len(names):
            return names[i]
    return root.name
