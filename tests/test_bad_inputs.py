"""Bad input, table-driven: every case names the call, the exception it must raise and a
fragment of its message, and for every case one shared check asserts that the failed call
changed nothing: parameters (bitwise, and the very objects), optimizer state (bitwise),
param_groups, and the FloraAccumulator's bookkeeping.

A case is (id, build, call, exception type, message fragment): ``build()`` returns a World
(the optimizer, accumulator and tensors involved, set up to just before the bad call) and
``call(world)`` makes the call. Add a row for every new error path.

The C++ optimizer class flora::Flora has no route from Python (tests/test_cpp.py compares
trajectories through its test binary); its argument checks are the library's shared ones,
reached here through the op torch.ops.flora.step_group_.
"""
import copy
from dataclasses import dataclass, field

import pytest
import torch

import flora_ext

LR = dict(lr=1e-2)
MOMENTUM = dict(lr=1e-2, beta1=0.9, rank=4)


@dataclass
class World:
    opt: object = None
    acc: object = None
    tensors: list = field(default_factory=list)  # further tensors a call must not change
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ the shared "unchanged" check


def _bits(t):
    t = t.detach()
    return (t.dtype, tuple(t.shape), t.reshape(-1).contiguous().view(torch.uint8).clone())


def _same_bits(a, b):
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _params(world):
    if world.opt is None:
        return []
    return [p for g in world.opt.param_groups for p in g["params"]]


def _value(v):
    return ("tensor", _bits(v)) if isinstance(v, torch.Tensor) else ("value", copy.deepcopy(v))


def _same_value(a, b):
    if a[0] != b[0]:
        return False
    return _same_bits(a[1], b[1]) if a[0] == "tensor" else a[1] == b[1]


def snapshot(world):
    params = _params(world)
    snap = {"params": [(p, _bits(p)) for p in params], "tensors": [_bits(t) for t in world.tensors]}
    if world.opt is not None:
        opt = world.opt
        # An empty entry is no state (torch.optim's defaultdict makes one on a read).
        snap["state"] = {k: {key: _value(v) for key, v in opt.state[p].items()}
                         for k, p in enumerate(params) if opt.state.get(p)}
        snap["groups"] = [({key: copy.deepcopy(v) for key, v in g.items() if key != "params"},
                           list(g["params"])) for g in opt.param_groups]
    if world.acc is not None:
        snap["acc"] = [(e.ordinal, e.count, e.seed, e.compressed,
                        None if e.buffer is None else _bits(e.buffer)) for e in world.acc._entries]
    return snap


def assert_unchanged(world, before):
    after = snapshot(world)
    assert len(after["params"]) == len(before["params"])
    for k, ((p, bits), (q, now)) in enumerate(zip(before["params"], after["params"])):
        assert p is q, f"parameter {k} was replaced"
        assert _same_bits(bits, now), f"parameter {k} changed"
    for k, (bits, now) in enumerate(zip(before["tensors"], after["tensors"])):
        assert _same_bits(bits, now), f"tensor {k} changed"
    if "state" in before:
        assert after["state"].keys() == before["state"].keys(), "state entries changed"
        for k, state in before["state"].items():
            assert after["state"][k].keys() == state.keys(), f"state keys of parameter {k}"
            for key, value in state.items():
                assert _same_value(value, after["state"][k][key]), f"state {key} of parameter {k}"
        assert len(after["groups"]) == len(before["groups"]), "param_groups changed"
        for (hyper, ps), (hyper_now, ps_now) in zip(before["groups"], after["groups"]):
            assert hyper_now == hyper and len(ps) == len(ps_now)
            assert all(a is b for a, b in zip(ps, ps_now))
    if "acc" in before:
        for k, (was, now) in enumerate(zip(before["acc"], after["acc"])):
            assert was[:4] == now[:4], f"accumulator entry {k} changed"
            assert (was[4] is None) == (now[4] is None), f"accumulator buffer {k}"
            assert was[4] is None or _same_bits(was[4], now[4]), f"accumulator buffer {k}"


# ------------------------------------------------------------------ builders


def stepped(shapes=((16, 40), (37,)), groups=1, **kw):
    """An optimizer over fresh parameters (one group each when groups > 1), stepped once,
    with fresh gradients set for the next step."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    hp = {**MOMENTUM, **kw}
    opt = flora_ext.Flora([{"params": [p]} for p in ps] if groups > 1 else ps, **hp)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in ps:
        p.grad = torch.randn_like(p)
    return World(opt=opt, extra={"ps": ps})


def two_groups_second_changed(change, step_first=True):
    def build():
        w = stepped(groups=2) if step_first else fresh_two_groups()
        change(w.extra["ps"][1], w.opt)
        return w
    return build


def fresh_two_groups():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(16, 40)), torch.nn.Parameter(torch.randn(37))]
    opt = flora_ext.Flora([{"params": [ps[0]]}, {"params": [ps[1]]}], **MOMENTUM)
    for p in ps:
        p.grad = torch.randn_like(p)
    return World(opt=opt, extra={"ps": ps})


def issue_float64_after_construction():
    p1, p2 = torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(6, 8))
    opt = flora_ext.Flora([{"params": [p1]}, {"params": [p2]}], **LR)
    p2.data = p2.data.double()
    p1.grad, p2.grad = torch.randn(6, 8), torch.randn(6, 8).double()
    return World(opt=opt, extra={"ps": [p1, p2]})


def out_of_memory_making_state():
    """Two groups, first step: making the second group's state runs out of memory (as
    torch.zeros on a full GPU would), after the first group's state was made."""
    w = fresh_two_groups()
    make_state = w.opt._init_state

    def init_state(p, group, state):
        if p is w.extra["ps"][1]:
            state["step"] = 0
            raise torch.OutOfMemoryError("simulated: out of memory making state")
        make_state(p, group, state)

    w.opt._init_state = init_state
    return w


def set_data(make):
    def change(p, opt):
        p.data = make(p)
    return change


def set_state(key, make):
    def change(p, opt):
        opt.state[p][key] = make(opt.state[p][key])
    return change


def set_state_data(key, make):
    def change(p, opt):
        t = opt.state[p][key]
        t.data = make(t)  # the same tensor object, other metadata
    return change


def non_contiguous(t):
    return torch.stack([t.detach(), t.detach()], -1)[..., 0]


def expanded_like(p):
    return p.detach()[:1].expand_as(p) if p.dim() else p.detach()


def with_group(key, value):
    def build():
        w = stepped(groups=2)
        w.opt.param_groups[1][key] = value
        return w
    return build


def step_param_with_grad(make):
    # (p.grad = x refuses another shape, dtype or device itself)
    def call(w):
        p = w.extra["ps"][0]
        w.opt.step_param(p, make(p))
    return call


def with_grad(make):
    def build():
        w = stepped()
        p = w.extra["ps"][0]
        p.grad = make(p)
        return w
    return build


def overlapping_param():
    return torch.nn.Parameter(torch.randn(1, 5).expand(4, 5))


def construct(params_fn, **kw):
    def build():
        return World(extra={"params": params_fn(), "kw": {**LR, **kw}})
    return build


def call_construct(w):
    flora_ext.Flora(w.extra["params"], **w.extra["kw"])


def adamw_state_dict(stepped_first):
    def build():
        w = stepped()
        ps = w.extra["ps"]
        adamw = torch.optim.AdamW(ps)
        if stepped_first:
            adamw.step()
        w.extra["sd"] = adamw.state_dict()
        return w
    return build


def flora_opt_state_dict():
    from flora_ext.testing import import_flora_opt  # a required test dependency
    w = stepped()
    other = import_flora_opt().Flora(w.extra["ps"], **MOMENTUM)
    other.step()
    w.extra["sd"] = other.state_dict()
    return w


def own_state_dict(edit):
    def build():
        w = stepped()
        sd = copy.deepcopy(w.opt.state_dict())
        edit(sd)
        w.extra["sd"] = sd
        return w
    return build


def load(w):
    w.opt.load_state_dict(w.extra["sd"])


def quantized_state_dict(into_quantized, edit=lambda sd: None):
    """A Flora (quantization=into_quantized), and the edited state_dict of one stepped with
    quantization=True to load into it."""
    def build():
        w = stepped(groups=2, quantization=into_quantized)
        sd = copy.deepcopy(stepped(groups=2, quantization=True).opt.state_dict())
        edit(sd)
        w.extra["sd"] = sd
        return w
    return build


def quantized_state_changed(key, make, quantization=True):
    """Two groups stepped (quantization=True unless told): the second parameter's state
    ``key`` replaced (removed when make returns None) before the next step."""
    def build():
        w = stepped(groups=2, quantization=quantization)
        state = w.opt.state[w.extra["ps"][1]]
        value = make(state)
        if value is None:
            state.pop(key)
        else:
            state[key] = value
        return w
    return build


def step(w):
    w.opt.step()


def step_three_times(w):
    # A retry must fail the same way and still change nothing (issue: each retry stepped
    # the first group again).
    for _ in range(2):
        with pytest.raises(TypeError):
            w.opt.step()
    w.opt.step()


# ------------------------------------------------------------------ accumulator builders


def two_linears(micro_batches=2, rank=None, order=None):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    opt = flora_ext.Flora([*a.parameters(), *b.parameters()], **LR)
    model = torch.nn.ModuleDict({"a": a, "b": b})
    acc = flora_ext.FloraAccumulator(opt, micro_batches=micro_batches, rank=rank, model=model)
    x = torch.randn(4, 8)
    return World(opt=opt, acc=acc, extra={"a": a, "b": b, "x": x})


def run_passes(w, passes):
    a, b, x = w.extra["a"], w.extra["b"], w.extra["x"]
    for which in passes:
        if which == "ab":
            b(a(x)).sum().backward()
        elif which == "a":      # b, nearer the output, gets no gradient
            a(x).sum().backward()
        elif which == "b":      # a, nearer the input, gets no gradient
            b(x).sum().backward()


def accumulator_after(passes, **kw):
    def build():
        w = two_linears(**kw)
        run_passes(w, passes)
        return w
    return build


def backward_ab(w):
    run_passes(w, ["ab"])


def backward_ab_four_times(w):
    for _ in range(3):
        with pytest.raises(RuntimeError, match="received no gradient"):
            backward_ab(w)
    backward_ab(w)


def sparse_embedding(rank):
    def build():
        emb = torch.nn.Embedding(10, 8, sparse=True)
        opt = flora_ext.Flora(emb.parameters(), **LR)
        acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=rank)
        return World(opt=opt, acc=acc, extra={"emb": emb})
    return build


def embedding_backward(w):
    w.extra["emb"](torch.tensor([1, 2, 3])).sum().backward()


# ------------------------------------------------------------------ op (the library's checks)


def op_world(param):
    def build():
        grad = torch.randn(param().shape)
        p = param()
        states = [torch.zeros(p.shape[0]), torch.zeros(p.shape[1])]
        return World(tensors=[p, grad, *states], extra={"p": p, "grad": grad, "states": states})
    return build


def call_op(w, **kw):
    torch.ops.flora.step_group_(
        [w.extra["p"]], [w.extra["grad"]], w.extra["states"], [1], [0], lr=1e-2, beta1=0.0,
        eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0, rank=0,
        kappa=1, scale_parameter=True, relative_step=False, warmup_init=False,
        factorize_second_moment=True, **kw)


def op_with_counter(counter):
    """The op with skip_nonfinite and ``counter`` (a poisoned gradient: a skip would count)."""
    def build():
        w = op_world(lambda: torch.randn(4, 6))()
        w.extra["grad"][0, 0] = float("nan")
        if counter is not None:
            w.extra["counter"] = counter()
            w.tensors.append(w.extra["counter"])
        return w

    def call(w):
        call_op(w, skip_nonfinite=True, nonfinite_skips=w.extra.get("counter"))
    return build, call


# ------------------------------------------------------------------ the table

CASES = [
    # -- step(): checked for every group before any group runs (issue 29 item 2)
    ("float64 param in group 2 set after construction, 3 tries", issue_float64_after_construction,
     step_three_times, TypeError, "parameters must be float32, float16 or bfloat16"),
    ("float64 param in group 2 after a step",
     two_groups_second_changed(set_data(lambda p: p.detach().double())),
     lambda w: (setattr(w.extra["ps"][1], "grad", torch.randn(37).double()), step(w)),
     TypeError, "got a parameter of dtype torch.float64"),
    ("non-contiguous state tensor in group 2 (new object)",
     two_groups_second_changed(set_state("second_moment", non_contiguous)), step,
     ValueError, "second_moment must be contiguous"),
    ("non-contiguous state tensor in group 2 (same object, t.data = x)",
     two_groups_second_changed(set_state_data("second_moment", non_contiguous)), step,
     ValueError, "second_moment must be contiguous"),
    ("non-contiguous state tensor in group 1 (same object, t.data = x)",
     two_groups_second_changed(lambda p, opt: set_state_data(
         "col_second_moment", non_contiguous)(opt.param_groups[0]["params"][0], opt)),
     step, (ValueError, RuntimeError), "col_second_moment must be contiguous"),
    ("float64 state tensor in group 2",
     two_groups_second_changed(set_state("momentum", lambda t: t.double())), step,
     ValueError, "momentum must be float32"),
    ("state tensor of the wrong shape in group 2",
     two_groups_second_changed(set_state("momentum", lambda t: torch.zeros(36))), step,
     ValueError, "must have shape (37,)"),
    ("state missing a key in group 2",
     two_groups_second_changed(lambda p, opt: opt.state[p].pop("momentum")), step,
     ValueError, "has keys"),
    ("state step negative in group 2",
     two_groups_second_changed(set_state("step", lambda s: -1)), step,
     ValueError, "step must be an int >= 0"),
    ("state tensor that is the parameter in group 2",
     two_groups_second_changed(lambda p, opt: opt.state[p].__setitem__("momentum", p)), step,
     ValueError, "must not be the parameter"),
    ("self-overlapping param in group 2 after a step (p.data = expanded)",
     two_groups_second_changed(set_data(expanded_like)), step,
     ValueError, "must not have elements that share memory"),
    ("self-overlapping param in group 2 before the first step",
     two_groups_second_changed(set_data(expanded_like), step_first=False), step,
     ValueError, "must not have elements that share memory"),
    ("fp16 param with stochastic_rounding set on group 2",
     two_groups_second_changed(lambda p, opt: (
         setattr(p, "data", p.detach().half()), setattr(p, "grad", p.grad.half()),
         opt.param_groups[1].__setitem__("stochastic_rounding", True))), step,
     ValueError, "stochastic_rounding supports bfloat16"),
    ("grad of another shape", stepped, step_param_with_grad(lambda p: torch.randn(40, 16)),
     ValueError, "grad shape (40, 16) differs"),
    ("grad of another dtype", stepped, step_param_with_grad(lambda p: torch.randn(16, 40).half()),
     TypeError, "grad dtype torch.float16 differs"),
    ("sparse grad", with_grad(lambda p: torch.randn(16, 40).to_sparse()), step,
     TypeError, "sparse gradients are not supported"),
    ("complex grad", stepped,
     step_param_with_grad(lambda p: torch.randn(16, 40, dtype=torch.complex64)),
     TypeError, "complex gradients"),
    ("grad on the meta device", stepped,
     step_param_with_grad(lambda p: torch.empty(16, 40, device="meta")),
     ValueError, "grad is on meta"),
    ("lr NaN on group 2", with_group("lr", float("nan")), step, ValueError, "lr must be"),
    ("kappa 0 on group 2", with_group("kappa", 0), step, ValueError, "kappa must be"),
    ("eps not a pair on group 2", with_group("eps", 1e-3), step, ValueError, "eps must be a pair"),
    ("out of memory while making state: no state is left half made",
     out_of_memory_making_state, step, torch.OutOfMemoryError, "simulated"),
    ("step_param with a grad of another shape",
     stepped, lambda w: w.opt.step_param(w.extra["ps"][0], torch.randn(3)),
     ValueError, "grad shape (3,) differs"),
    ("step_param without a grad",
     stepped, lambda w: (setattr(w.extra["ps"][0], "grad", None), w.opt.step_param(w.extra["ps"][0])),
     ValueError, "needs a gradient"),
    # -- construction and add_param_group (issue 29 item 7)
    ("self-overlapping param at construction", construct(lambda: [overlapping_param()]),
     call_construct, ValueError, "must not have elements that share memory"),
    ("float64 param at construction",
     construct(lambda: [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]),
     call_construct, TypeError, "float32, float16 or bfloat16"),
    ("self-overlapping param in add_param_group",
     stepped, lambda w: w.opt.add_param_group({"params": [overlapping_param()]}),
     ValueError, "must not have elements that share memory"),
    # -- load_state_dict (issue 29 item 4)
    ("AdamW state_dict after a step", adamw_state_dict(True), load,
     ValueError, "not a flora_ext.Flora state_dict (its state has keys ['exp_avg', 'exp_avg_sq']"),
    ("AdamW state_dict before a step", adamw_state_dict(False), load,
     ValueError, "not a flora_ext.Flora state_dict (its param_groups lack"),
    ("flora-opt's state_dict", flora_opt_state_dict, load,
     ValueError, "not a flora_ext.Flora state_dict (its state has keys ['RMS'"),
    ("state_dict without param_groups", own_state_dict(lambda sd: sd.pop("param_groups")), load,
     ValueError, "must have 'state' and 'param_groups'"),
    ("state_dict not a dict", stepped, lambda w: w.opt.load_state_dict([1, 2]),
     TypeError, "state_dict must be a dict"),
    ("state_dict with an integer state tensor",
     own_state_dict(lambda sd: sd["state"][0].__setitem__(
         "momentum", sd["state"][0]["momentum"].long())), load,
     ValueError, "momentum must be a float tensor"),
    ("state_dict with a state tensor of the wrong shape",
     own_state_dict(lambda sd: sd["state"][1].__setitem__("momentum", torch.zeros(5))), load,
     ValueError, "must have shape (37,)"),
    ("state_dict with another group count",
     own_state_dict(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))), load,
     ValueError, "2 parameter groups"),
    ("state_dict with an invalid hyper-parameter",
     own_state_dict(lambda sd: sd["param_groups"][0].__setitem__("kappa", 0)), load,
     ValueError, "kappa must be"),
    ("state_dict with a state of an unknown parameter",
     own_state_dict(lambda sd: sd["state"].__setitem__(7, dict(sd["state"][1]))), load,
     ValueError, "refers to parameter 7"),
    # -- quantization=True's 8-bit state (docs/FLORA.md §11)
    ("8-bit state_dict into quantization=False", quantized_state_dict(False), load,
     ValueError, "made with quantization=True; this optimizer has quantization=False"),
    ("8-bit state_dict with int8 codes",
     quantized_state_dict(True, lambda sd: sd["state"][1].__setitem__(
         "momentum", sd["state"][1]["momentum"].to(torch.int8))), load,
     ValueError, "momentum must be uint8 (8-bit codes, as momentum_absmax says), got torch.int8"),
    ("8-bit state_dict with uint8 codes but no absmax",
     quantized_state_dict(True, lambda sd: sd["state"][1].pop("second_moment_absmax")), load,
     ValueError, "second_moment must be a float tensor (second_moment_absmax is missing)"),
    ("8-bit state_dict with an absmax of the wrong shape",
     quantized_state_dict(True, lambda sd: sd["state"][1].__setitem__(
         "momentum_absmax", torch.zeros(2))), load,
     ValueError, "momentum_absmax of a parameter of shape (37,) must have shape (1,), got (2,)"),
    ("8-bit state_dict with codes of the wrong shape",
     quantized_state_dict(True, lambda sd: sd["state"][0].__setitem__(
         "momentum", torch.zeros(4, 41, dtype=torch.uint8))), load,
     ValueError, "momentum of a parameter of shape (16, 40) must have shape (4, 40)"),
    ("8-bit state_dict with float codes beside an absmax",
     quantized_state_dict(True, lambda sd: sd["state"][1].__setitem__(
         "momentum", torch.zeros(37))), load,
     ValueError, "momentum must be uint8 (8-bit codes, as momentum_absmax says), got torch.float32"),
    ("quantization=True, float32 momentum put in the state",
     quantized_state_changed("momentum", lambda st: torch.zeros(37)), step,
     ValueError, "momentum must be uint8 (8-bit codes, quantization=True), got torch.float32"),
    ("quantization=True, absmax removed from the state",
     quantized_state_changed("second_moment_absmax", lambda st: None), step,
     ValueError, "expected ['momentum', 'momentum_absmax', 'second_moment', "
                 "'second_moment_absmax', 'step']"),
    ("quantization=True, absmax of the wrong shape in the state",
     quantized_state_changed("momentum_absmax", lambda st: torch.zeros(3)), step,
     ValueError, "momentum_absmax of a parameter of shape (37,) must have shape (1,)"),
    ("quantization=True, absmax on another dtype in the state",
     quantized_state_changed("momentum_absmax", lambda st: st["momentum_absmax"].half()), step,
     ValueError, "momentum_absmax must be float32, got torch.float16"),
    ("quantization=False, 8-bit state put in the state",
     quantized_state_changed("momentum_absmax", lambda st: torch.zeros(1), quantization=False),
     step, ValueError, "made with quantization=True"),
    ("quantization=True, torch.compile",
     lambda: stepped(quantization=True), lambda w: torch.compile(w.opt.step, fullgraph=True)(),
     RuntimeError, "does not support quantization=True"),
    # -- FloraAccumulator: a parameter without a gradient (issue 29 item 1)
    ("accumulator: b (nearer the output) got no gradient, next backward",
     accumulator_after(["ab", "a"]), backward_ab, RuntimeError,
     "parameter 'b.weight' (shape (8, 8)) (and 1 more) received no gradient"),
    ("accumulator: b got no gradient, every later backward too (issue's loop)",
     accumulator_after(["ab", "a"]), backward_ab_four_times,
     RuntimeError, "received no gradient in a backward pass"),
    ("accumulator: b got no gradient, 3 micro-batches",
     accumulator_after(["ab", "a"], micro_batches=3), backward_ab, RuntimeError,
     "parameter 'b.weight'"),
    ("accumulator: b got no gradient, compressed",
     accumulator_after(["ab", "a"], rank=2), backward_ab, RuntimeError, "parameter 'b.weight'"),
    ("accumulator: a (nearer the input) got no gradient",
     accumulator_after(["ab", "b"]), backward_ab, RuntimeError,
     "parameter 'a.weight' (shape (8, 8)) (and 1 more) received no gradient"),
    ("accumulator: b got no gradient, layer-wise stepping (micro_batches=1)",
     accumulator_after(["ab", "a"], micro_batches=1), backward_ab, RuntimeError,
     "parameter 'b.weight'"),
    ("accumulator: one micro-batch split over two backward calls",
     accumulator_after(["a"]), lambda w: run_passes(w, ["b"]), RuntimeError,
     "parameter 'b.weight' (shape (8, 8)) (and 1 more) received no gradient"),
    ("accumulator: no gradient in the first pass",
     accumulator_after(["a"]), backward_ab, RuntimeError, "parameter 'b.weight'"),
    ("accumulator: b got no gradient, then opt.step()",
     accumulator_after(["ab", "a"]), step, RuntimeError, "optimizer.step(): parameter 'b.weight'"),
    ("accumulator: b got no gradient, then state_dict()",
     accumulator_after(["ab", "a"]), lambda w: w.acc.state_dict(), RuntimeError,
     "state_dict(): parameter 'b.weight'"),
    ("accumulator: opt.step() mid-cycle", accumulator_after(["ab"]), step, RuntimeError,
     "after 1 of 2 micro-batches"),
    ("accumulator: a .grad set outside backward, then opt.step()",
     accumulator_after(["ab", "ab"]),
     lambda w: (setattr(w.extra["a"].bias, "grad", torch.randn(8)), step(w)),
     RuntimeError, "twice"),
    # -- FloraAccumulator: sparse gradients (issue 29 item 4)
    ("accumulator: sparse grad, compressed accumulation", sparse_embedding(2),
     embedding_backward, TypeError, "sparse gradients are not supported"),
    ("accumulator: sparse grad, dense accumulation", sparse_embedding(None),
     embedding_backward, TypeError, "sparse gradients are not supported"),
    # -- FloraAccumulator construction
    ("accumulator: micro_batches 0", two_linears,
     lambda w: flora_ext.FloraAccumulator(w.opt, micro_batches=0), ValueError,
     "micro_batches must be an int >= 1"),
    ("accumulator: a second one on the same optimizer", two_linears,
     lambda w: flora_ext.FloraAccumulator(w.opt), RuntimeError, "already has a FloraAccumulator"),
    ("accumulator: a parameter not in the optimizer", two_linears,
     lambda w: (w.acc.remove(), flora_ext.FloraAccumulator(
         w.opt, params=[torch.nn.Parameter(torch.randn(2))])), ValueError, "must belong"),
    ("accumulator: not a Flora optimizer", two_linears,
     lambda w: flora_ext.FloraAccumulator(torch.optim.SGD(w.extra["a"].parameters(), lr=1)),
     TypeError, "needs a flora_ext.Flora"),
    # -- the op (the library's shared checks, as flora::Flora runs them)
    ("op: self-overlapping param", op_world(lambda: torch.randn(1, 5).expand(4, 5)), call_op,
     RuntimeError, "param must not have elements that share memory"),
    ("op: skip_nonfinite without a counter", *op_with_counter(None),
     RuntimeError, "skip_nonfinite=True needs nonfinite_skips"),
    ("op: skip_nonfinite with an int32 counter",
     *op_with_counter(lambda: torch.zeros(1, dtype=torch.int32)),
     RuntimeError, "nonfinite_skips must be an int64 tensor of one element, got Int"),
    ("op: skip_nonfinite with a counter of two elements",
     *op_with_counter(lambda: torch.zeros(2, dtype=torch.int64)),
     RuntimeError, "nonfinite_skips must be an int64 tensor of one element"),
    # -- skip_nonfinite must be a bool
    ("skip_nonfinite not a bool at construction",
     construct(lambda: [torch.nn.Parameter(torch.randn(3))], skip_nonfinite=1),
     call_construct, TypeError, "flora: skip_nonfinite must be a bool, got 1"),
    ("skip_nonfinite not a bool on group 2", with_group("skip_nonfinite", "yes"), step,
     TypeError, "flora: skip_nonfinite must be a bool, got 'yes'"),
    ("skip_nonfinite None in add_param_group", stepped,
     lambda w: w.opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))],
                                      "skip_nonfinite": None}),
     TypeError, "flora: skip_nonfinite must be a bool, got None"),
]


@pytest.mark.parametrize("build,call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_and_changes_nothing(build, call, exc, match):
    world = build()
    before = snapshot(world)
    with pytest.raises(exc) as err:
        call(world)
    assert match in str(err.value), f"message {str(err.value)!r} lacks {match!r}"
    assert_unchanged(world, before)


def test_the_unchanged_check_sees_a_change():
    world = stepped()
    before = snapshot(world)
    world.opt.step()
    with pytest.raises(AssertionError):
        assert_unchanged(world, before)
    world = two_linears()
    before = snapshot(world)
    run_passes(world, ["ab"])
    with pytest.raises(AssertionError, match="accumulator entry"):
        assert_unchanged(world, before)


# ------------------------------------------------------------------ beyond the error itself


def test_failed_steps_leave_the_first_group_unstepped_then_a_fixed_step_runs():
    w = issue_float64_after_construction()
    p1, p2 = w.extra["ps"]
    before = p1.detach().clone()
    for _ in range(3):
        with pytest.raises(TypeError):
            w.opt.step()
    assert w.opt.state.get(p1, {}).get("step", 0) == 0 and torch.equal(p1, before)
    p2.data, p2.grad = p2.data.float(), p2.grad.float()
    w.opt.step()
    assert w.opt.state[p1]["step"] == 1 and w.opt.state[p2]["step"] == 1


def test_accumulator_recovers_after_reset():
    w = accumulator_after(["ab", "a"])()
    with pytest.raises(RuntimeError, match="received no gradient"):
        backward_ab(w)
    w.acc.reset()
    for _ in range(4):
        backward_ab(w)
    a, b = w.extra["a"], w.extra["b"]
    # a stepped once before the error (its cycle of passes 1 and 2), then twice more
    assert w.opt.state[a.weight]["step"] == 3 and w.opt.state[b.weight]["step"] == 2
    w.opt.step()  # the cycle is complete: no error


def test_accumulator_skips_nothing_in_a_consistent_run_with_reentrant_checkpoint():
    # The per-pass check must not take a reentrant backward (inside checkpoint's backward)
    # for a new pass, whether the checkpointed part is nearest the output or not.
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    first, last = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    opt = flora_ext.Flora([*first.parameters(), *last.parameters()], **LR)
    flora_ext.FloraAccumulator(opt, micro_batches=2)
    x = torch.randn(4, 8)
    for _ in range(4):
        checkpoint(last, first(x), use_reentrant=True).sum().backward()
    for _ in range(4):
        last(checkpoint(first, x.requires_grad_(), use_reentrant=True)).sum().backward()
    assert all(opt.state[p]["step"] == 4 for p in opt.param_groups[0]["params"])


def test_load_state_dict_of_own_state_with_an_empty_entry():
    a, b = torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(6, 8))
    opt = flora_ext.Flora([a, b], **LR)
    a.grad = torch.randn(6, 8)
    opt.step()
    assert opt.state[b] == {}  # the read makes an empty entry, as in torch.optim
    opt.load_state_dict(opt.state_dict())
    assert opt.state[b] == {} and opt.state[a]["step"] == 1
    b.grad = torch.randn(6, 8)
    opt.step()
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1


def test_load_state_dict_runs_hooks_as_torch_optim_does():
    ps = [torch.nn.Parameter(torch.randn(6, 8))]
    opt = flora_ext.Flora(ps, **LR)
    ps[0].grad = torch.randn(6, 8)
    opt.step()
    calls = []

    def pre(optimizer, state_dict):
        calls.append(("pre", optimizer is opt))
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [dict(g, lr=0.5) for g in state_dict["param_groups"]]
        return state_dict

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda optimizer: calls.append(("post", optimizer is opt)))
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert calls == [("pre", True), ("post", True)]
    assert opt.param_groups[0]["lr"] == 0.5 and saved["param_groups"][0]["lr"] == 1e-2


def test_load_state_dict_keeps_param_names_like_torch():
    model = torch.nn.Linear(4, 3)
    opt = flora_ext.Flora(model.named_parameters(), **LR)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["weight", "bias"]
    del sd["param_groups"][0]["param_names"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    reference = torch.optim.AdamW(model.named_parameters())
    reference.load_state_dict({**reference.state_dict(), "param_groups": [
        {k: v for k, v in g.items() if k != "param_names"}
        for g in reference.state_dict()["param_groups"]]})
    assert reference.param_groups[0]["param_names"] == ["weight", "bias"]


def test_loaded_state_tensors_are_contiguous_float32():
    w = stepped()
    sd = copy.deepcopy(w.opt.state_dict())
    sd["state"][1]["momentum"] = non_contiguous(sd["state"][1]["momentum"].double())
    w.opt.load_state_dict(sd)
    t = w.opt.state[w.extra["ps"][1]]["momentum"]
    assert t.is_contiguous() and t.dtype == torch.float32
    w.opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_reuse_param_norms_false_survives_copies(how):
    import io
    import pickle
    opt = flora_ext.Flora([torch.nn.Parameter(torch.randn(4, 4))], lr=1e-2, reuse_param_norms=False)
    if how == "deepcopy":
        copied = copy.deepcopy(opt)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(opt))
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    assert copied.reuse_param_norms is False
    assert copy.deepcopy(flora_ext.Flora([torch.nn.Parameter(torch.randn(2))], **LR)).reuse_param_norms


def test_a_fault_in_a_later_group_says_which_groups_stepped():
    # The checks run for every group first, so only a fault at run time (out of memory,
    # simulated here) can stop a step after an earlier group's op ran; that is not undone,
    # and the error says so. The failed group's fresh state is emptied again.
    w = fresh_two_groups()
    run_plan = w.opt._run_plan

    def failing(plan, grads):
        if plan.params[0] is w.extra["ps"][1]:
            raise torch.OutOfMemoryError("simulated: out of memory in the op")
        run_plan(plan, grads)

    w.opt._run_plan = failing
    with pytest.raises(torch.OutOfMemoryError) as err:
        w.opt.step()
    assert "had already stepped the first 1 of its 2 parameter groups" in "".join(
        getattr(err.value, "__notes__", []))
    assert w.opt.state[w.extra["ps"][0]]["step"] == 1 and not w.opt.state.get(w.extra["ps"][1])
