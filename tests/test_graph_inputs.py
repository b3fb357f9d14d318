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


def test_split_moves_only_host_arithmetic_and_restore_puts_the_placeholder_back():
    gm, ex = _dynamo_graph(lambda x, n: (x.sin(), n + 1, n * 3), torch.randn(4), 5)
    ints = [i for i, e in enumerate(ex) if isinstance(e, torch.SymInt)]
    n_ph = len([n for n in gm.graph.nodes if n.op == "placeholder"])
    moved = graph_inputs.split_host_ints(gm, ex)
    if not ints:  # this torch specialized the int: nothing to move
        assert moved is None
        return
    assert moved is not None and moved.inputs == [ints[-1]]  # n, not x's size symbol
    left = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(left) == n_ph - 1
    outs = [o for o in gm.graph.output_node().args[0]] if hasattr(gm.graph, "output_node") else None
    assert outs is None or len(outs) == 1  # only the tensor is computed by the graph
    args = [torch.ones(4) if isinstance(e, torch.Tensor) else 7 for e in ex]
    full = moved.merge([torch.ones(4)], args)
    assert full[1:] == [8, 21]
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
    """a only reaches the output (moves); b also reaches a tensor, and b + 2 stays with it."""
    gm, ex = _dynamo_graph(lambda x, a, b: (x * b, a + 1, b + 2), torch.randn(4), 5, 6)
    ints = [i for i, e in enumerate(ex) if isinstance(e, torch.SymInt)]
    moved = graph_inputs.split_host_ints(gm, ex)
    if len(ints) < 3:  # x's size and both ints; this torch specialized something
        return
    assert moved is not None and len(moved.inputs) == 1 and moved.outputs == [1]
    args = [torch.ones(4) if isinstance(e, torch.Tensor) else 0 for e in ex]
    args[moved.inputs[0]] = 10
    outs = moved.merge([torch.ones(4), 8], args)
    assert outs[1:] == [11, 8]
    moved.restore(gm)
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == len(ex)
