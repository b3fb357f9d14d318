"""graph_inputs.py: host ints moved out of a decode graph (one graph for every step instead of a
CUDA graph recorded per value), and the in-place-written inputs the backend marks static."""
import torch
import torch.fx as fx

import mxfp4_compile  # noqa: F401  (registers backend="mxfp4")
from mxfp4_compile import backend, graph_inputs


class Counter:
    """A Python int attribute that grows every call (transformers' sliding-window cache keeps
    ``cumulative_length_int`` this way)."""

    def __init__(self):
        self.n = 0


def step(x, c):
    c.n += x.shape[0]
    return x * 2 + 1


def test_a_growing_int_attribute_compiles_once_and_keeps_counting():
    graphs = []

    def recording(gm, ex):
        graphs.append([type(e).__name__ for e in ex])
        return backend.mxfp4_backend(gm, ex)

    f = torch.compile(step, backend=recording)
    c, x = Counter(), torch.randn(3, 4)
    n0 = len(backend.last_compile_info)
    for i in range(5):
        with torch.no_grad():  # MXFP4 compiles need it (with grad the backend is plain Inductor)
            out = f(x, c)
        assert torch.equal(out, x * 2 + 1)
        assert c.n == 3 * (i + 1)  # the host int the graph returns, computed by the wrapper
    infos = backend.last_compile_info[n0:]
    # the first call specializes the int; the second compiles it as a SymInt, which the backend
    # takes out of the graph; no compile after that
    assert len(infos) == 2 and infos[-1]["host_ints"] == 1, infos
    assert "SymInt" in graphs[-1]


def test_an_int_that_reaches_a_tensor_stays_in_the_graph():
    def use(x, c):
        c.n += 1
        return x + c.n  # the int is a kernel argument: it must stay a graph input

    f = torch.compile(use, backend="mxfp4")
    c, x = Counter(), torch.zeros(2)
    n0 = len(backend.last_compile_info)
    for i in range(4):
        with torch.no_grad():
            assert torch.equal(f(x, c), x + (i + 1))
    assert all(i["host_ints"] == 0 for i in backend.last_compile_info[n0:])


def _dynamo_graph(fn, *args):
    got = []

    def grab(gm, ex):
        got.append((gm, ex))
        return gm.forward

    f = torch.compile(fn, backend=grab, dynamic=True)
    f(*args)
    return got[-1]


def _bump(x, c):
    c.n += 1
    c.m = c.n * 3  # host arithmetic on the int, returned to set another attribute
    return x.sin()


def test_split_moves_only_host_arithmetic_and_restore_puts_the_placeholder_back():
    gm, ex = _dynamo_graph(_bump, torch.randn(4), Counter())
    ints = [i for i, e in enumerate(ex) if isinstance(e, torch.SymInt)]
    n_ph = len([n for n in gm.graph.nodes if n.op == "placeholder"])
    assert len(ints) == 2  # c.n and x's size symbol (dynamic=True)
    moved = graph_inputs.split_host_ints(gm, ex)
    assert moved is not None and len(moved.inputs) == 1  # c.n, not the size symbol
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == n_ph - 1
    outs = gm.graph.find_nodes(op="output")[0].args[0]
    assert len(outs) == 1  # only the tensor is computed by the graph
    args = [torch.ones(4) if isinstance(e, torch.Tensor) else 0 for e in ex]
    args[moved.inputs[0]] = 10
    full = moved.merge([torch.ones(4)], args)
    assert sorted(full[1:]) == [11, 33]
    moved.restore(gm)
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == n_ph


def test_mutated_inputs_of_an_aot_graph():
    g = fx.Graph()
    a, b, c = g.placeholder("a"), g.placeholder("b"), g.placeholder("c")
    s = g.call_function(torch.ops.aten.add.Tensor, (b, c))
    g.call_function(torch.ops.aten.copy_.default, (a, s))
    g.call_function(torch.ops.aten.index_copy_.default, (c, 0, g.call_function(
        torch.ops.aten.arange.default, (1,)), b))
    g.output((s,))
    assert graph_inputs.mutated_inputs(fx.GraphModule(torch.nn.Module(), g)) == [0, 2]


def test_an_int_read_by_a_tensor_and_by_the_output_stays_whole():
    """n feeds x + n (a tensor) and n * 3 (returned): n stays a graph input, and so does n * 3
    (moving it alone would leave the host function without its input)."""
    gm, ex = _dynamo_graph(lambda x, n: (x + n, n * 3), torch.randn(4), 5)
    assert graph_inputs.split_host_ints(gm, ex) is None


def test_two_ints_one_movable():
    """c.a only reaches the output (moves); c.b also reaches a tensor, so it and c.b + 2 stay."""
    def f(x, c):
        c.a += 1
        c.b += 2
        return x * c.b

    c = Counter()
    c.a, c.b = 5, 6
    gm, ex = _dynamo_graph(f, torch.randn(4), c)
    assert sum(isinstance(e, torch.SymInt) for e in ex) == 3  # c.a, c.b, x's size
    moved = graph_inputs.split_host_ints(gm, ex)
    assert moved is not None and len(moved.inputs) == 1 and len(moved.outputs) == 1
    args = [torch.ones(4) if isinstance(e, torch.Tensor) else 0 for e in ex]
    args[moved.inputs[0]] = 10
    kept = gm.graph.find_nodes(op="output")[0].args[0]
    assert len(kept) == 2  # x * (b + 2) and b + 2 stay in the graph
    outs = moved.merge([torch.ones(4), 8], args)
    assert len(outs) == 3 and outs[1:] == [8, 11]  # (x * (b + 2), b + 2, a + 1)
    moved.restore(gm)
    assert len(gm.graph.find_nodes(op="placeholder")) == len(ex)
