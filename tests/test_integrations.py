"""Flora with what training code around it expects: torch's cycling LR schedulers
(OneCycleLR, CyclicLR with cycle_momentum=True) and Hugging Face Trainer
(flora_ext.integrations.hf), the latter on a tiny random-init Llama on the CPU."""
import copy
import math
import pickle

import pytest
import torch

import flora_ext

FLORA = dict(lr=1e-2, beta1=0.9, rank=4, kappa=3)


# ---------------------------------------------------------------- cycle_momentum schedulers
def params():
    torch.manual_seed(0)
    # (8, 16) compressed momentum, (16,) dense momentum
    return [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16))]


def grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(8, 16, generator=gen), torch.randn(16, generator=gen)]


def one_cycle_momentum(step, total, pct=0.3, low=0.85, high=0.95):
    """OneCycleLR's beta1 at scheduler step ``step`` (cos annealing, two phases): high ->
    low over the first pct * total - 1 steps, then back to high at step total - 1."""
    peak, end = pct * total - 1, total - 1

    def cos(start, stop, t):
        return stop + (start - stop) / 2 * (math.cos(math.pi * t) + 1)

    if step <= peak:
        return cos(high, low, step / peak)
    return cos(low, high, (step - peak) / (end - peak))


def cyclic_momentum(step, up, low=0.8, high=0.9):
    """CyclicLR's (triangular, symmetric) beta1: high at a cycle's start, low at its lr peak."""
    t = step % (2 * up)
    scale = t / up if t <= up else (2 * up - t) / up
    return high - (high - low) * scale


SCHEDULERS = {
    "OneCycleLR": (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05,
                                                                   total_steps=10),
                   lambda k: one_cycle_momentum(k, 10)),
    "CyclicLR": (lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=0.05,
                                                               step_size_up=3),
                 lambda k: cyclic_momentum(k, 3)),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_cycle_momentum_drives_beta1(name):
    make_scheduler, expected = SCHEDULERS[name]
    ps, ref_ps, fixed_ps = params(), params(), params()
    opt = flora_ext.Flora(ps, **FLORA)
    sched = make_scheduler(opt)
    ref = flora_ext.Flora(ref_ps, **FLORA)  # beta1 and lr set by hand each step
    fixed = flora_ext.Flora(fixed_ps, **FLORA)  # lr by hand, beta1 left at its first value
    group = opt.param_groups[0]
    for k in range(9):
        assert group["beta1"] == pytest.approx(expected(k), abs=1e-12), k
        assert group["momentum"] == group["beta1"] and "momentum" in group
        saved = opt.state_dict()["param_groups"][0]
        assert saved["beta1"] == group["beta1"] and "momentum" not in saved
        ref.param_groups[0].update(lr=group["lr"], beta1=group["beta1"])
        fixed.param_groups[0].update(lr=group["lr"], beta1=expected(0))
        for p, q, r, g in zip(ps, ref_ps, fixed_ps, grads(k)):
            p.grad, q.grad, r.grad = g, g.clone(), g.clone()
        opt.step()
        ref.step()
        fixed.step()
        sched.step()
        for p, q in zip(ps, ref_ps):
            assert torch.equal(p, q), k
    # beta1 did change the steps: the run with a constant beta1 went elsewhere
    assert not all(torch.equal(p, r) for p, r in zip(ps, fixed_ps))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_cycle_momentum_resumes_from_state_dicts(name):
    make_scheduler, _ = SCHEDULERS[name]

    def run(steps, resume=None):
        ps = params()
        opt = flora_ext.Flora(ps, **FLORA)
        sched = make_scheduler(opt)
        start = 0
        if resume is not None:
            with torch.no_grad():
                for p, saved_p in zip(ps, resume[3]):
                    p.copy_(saved_p)
            opt.load_state_dict(resume[0])
            sched.load_state_dict(resume[1])
            start = resume[2]
        for k in range(start, steps):
            for p, g in zip(ps, grads(k)):
                p.grad = g
            opt.step()
            sched.step()
        saved = (copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()), steps,
                 [p.detach().clone() for p in ps])
        return ps, saved, opt

    full, _, _ = run(9)
    _, saved, _ = run(4)
    resumed, _, opt = run(9, resume=saved)
    assert all(torch.equal(p, q) for p, q in zip(full, resumed))
    # the aliasing survives load_state_dict, pickling and deepcopy
    for clone in (opt, pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        group = clone.param_groups[0]
        group["momentum"] = 0.5
        assert group["beta1"] == 0.5 and "momentum" in clone.defaults
        group.update(momentum=0.6)
        group |= {"momentum": 0.7}
        assert group.setdefault("momentum", 0.1) == 0.7 == group["beta1"] == group.get("momentum")
        assert "momentum" not in group.keys()


def test_cycle_momentum_without_beta1_is_refused():
    opt = flora_ext.Flora(params(), lr=1e-2)  # beta1=None: no momentum state
    for make_scheduler, _ in SCHEDULERS.values():
        with pytest.raises(ValueError, match="cycle_momentum=False"):
            make_scheduler(opt)
        assert opt.param_groups[0]["beta1"] is None
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10, cycle_momentum=False)
    assert opt.param_groups[0]["beta1"] is None


def test_cycle_momentum_cannot_reach_zero_or_one():
    opt = flora_ext.Flora(params(), **FLORA)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=0.05, step_size_up=2,
                                              base_momentum=0.0, max_momentum=0.9)
    for k in range(2):
        for p, g in zip(opt.param_groups[0]["params"], grads(k)):
            p.grad = g
        opt.step()
        if k == 0:
            sched.step()
    assert opt.param_groups[0]["beta1"] == pytest.approx(0.45)
    with pytest.raises(ValueError, match="turn the first moment off"):
        sched.step()  # beta1 would reach 0 at the lr peak
    assert opt.param_groups[0]["beta1"] == pytest.approx(0.45)
    with pytest.raises(ValueError, match=r"momentum .* must be a float in \[0, 1\), got 1.0"):
        opt.param_groups[0]["momentum"] = 1.0
    with pytest.raises(ValueError, match="Flora's name for the first-moment coefficient is beta1"):
        flora_ext.Flora([{"params": params(), "momentum": 0.9}], **FLORA)


# ---------------------------------------------------------------- Hugging Face Trainer
@pytest.fixture
def hf():
    pytest.importorskip("transformers")
    from accelerate.state import AcceleratorState, GradientState

    from flora_ext.integrations import hf

    yield hf
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class TokenData(torch.utils.data.Dataset):
    """Random token sequences, labels = inputs (causal LM)."""

    def __init__(self, count=10, length=8, vocab=64):
        gen = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (count, length), generator=gen)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=16))


def training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    # 10 samples, 2 a batch: 5 micro-batches an epoch, windows of 2, 2 and 1 (short)
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=1e-2,
                  weight_decay=0.01, optim_args="rank=4,kappa=3,beta1=0.9", max_grad_norm=0.0,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                  disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(hf, args, accumulation=None, resume=None, **callback_kw):
    """Trains tiny_llama with Flora from args; accumulation: None (Trainer's own) or
    ("dense" | rank) through the callback. Returns the model and the trainer."""
    from transformers import Trainer

    model = tiny_llama()
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(),
                      optimizer_cls_and_kwargs=hf.flora_optimizer_cls_and_kwargs(args))
    if accumulation is not None:
        hf.add_flora_accumulation(trainer, rank=None if accumulation == "dense" else accumulation,
                                  **callback_kw)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_training_arguments_to_flora(hf, tmp_path):
    from transformers import Trainer

    args = training_args(tmp_path, learning_rate=3e-3, weight_decay=0.05, optim_args=(
        "rank=16, kappa=50,beta1=0.8,eps2=2e-3,seed=7,factorize_second_moment=false,"
        "clip_threshold=0.5,decay_rate=-0.7,tf32=0,scale_parameter=true"))
    expected = dict(lr=3e-3, weight_decay=0.05, rank=16, kappa=50, beta1=0.8, eps=(1e-30, 2e-3),
                    seed=7, factorize_second_moment=False, clip_threshold=0.5, decay_rate=-0.7,
                    tf32=False, scale_parameter=True)
    assert hf.flora_optimizer_kwargs(args) == expected
    assert hf.parse_optim_args("rank=none,beta1=None") == dict(rank=None, beta1=None)
    assert hf.parse_optim_args("max_aspect_ratio=none") == dict(max_aspect_ratio=None)
    assert hf.parse_optim_args("max_aspect_ratio=8") == dict(max_aspect_ratio=8.0)
    assert hf.parse_optim_args("") == {} and hf.parse_optim_args(None) == {}

    model = tiny_llama()
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(),
                      optimizer_cls_and_kwargs=hf.flora_optimizer_cls_and_kwargs(args))
    for opt in (trainer.create_optimizer(), hf.create_flora_optimizer(model, args)):
        assert isinstance(opt, flora_ext.Flora) and len(opt.param_groups) == 2
        decayed, plain = opt.param_groups
        for group in opt.param_groups:
            for key, value in expected.items():
                if key != "weight_decay":
                    assert group[key] == value, key
        assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
        names = {id(p): n for n, p in model.named_parameters()}
        assert all("norm" in names[id(p)] for p in plain["params"])
        assert sum(map(len, (decayed["params"], plain["params"]))) == \
            len(list(model.parameters()))


@pytest.mark.parametrize("optim_args,match", [
    ("rnk=4", "key 'rnk' is not a Flora setting; known keys: rank, kappa"),
    ("rank=four", "optim_args rank must be an int or 'none', got 'four'"),
    ("beta1=0.9x", "optim_args beta1 must be a float or 'none', got '0.9x'"),
    ("kappa=1e3", "optim_args kappa must be an int, got '1e3'"),
    ("tf32=maybe", "optim_args tf32 must be true or false, got 'maybe'"),
    ("eps1=nan", "optim_args eps1 must be a float, got 'nan'"),
    ("rank=4,rank=8", "sets rank twice"),
    ("rank", "entries must look like key=value, got 'rank'"),
    ("lr=1e-3", "cannot set lr: set TrainingArguments.learning_rate"),
    ("weight_decay=0.1", "cannot set weight_decay: set TrainingArguments.weight_decay"),
    ("eps=1e-3", "eps1=...,eps2=..."),
    ("relative_step=true", "cannot set relative_step"),
])
def test_bad_optim_args(hf, tmp_path, optim_args, match):
    with pytest.raises(ValueError, match=match):
        hf.flora_optimizer_kwargs(training_args(tmp_path, optim_args=optim_args))


def test_flora_checks_the_parsed_values(hf, tmp_path):
    cls, kwargs = hf.flora_optimizer_cls_and_kwargs(training_args(tmp_path,
                                                                  optim_args="beta1=1.5"))
    with pytest.raises(ValueError, match=r"flora: beta1 must be None or a float in \[0, 1\)"):
        cls(tiny_llama().parameters(), **kwargs)


def test_dense_accumulation_equals_trainer_accumulation(hf, tmp_path):
    """Windows of 2, 2, 1 micro-batches per epoch: the callback's cycles follow Trainer's,
    the short last window included, bitwise; and the logged grad_norm is the true one."""
    plain, plain_trainer = train(hf, training_args(tmp_path / "plain"))
    hooked, hooked_trainer = train(hf, training_args(tmp_path / "hooked"), accumulation="dense")
    assert hooked_trainer.state.global_step == plain_trainer.state.global_step == 6
    for (name, p), q in zip(plain.named_parameters(), hooked.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(next(plain.parameters()), next(tiny_llama().parameters()))
    expected, got = logged(plain_trainer, "grad_norm"), logged(hooked_trainer, "grad_norm")
    assert len(got) == 6 and min(got) > 0.1
    assert got == pytest.approx(expected, rel=1e-5)


def test_compressed_accumulation_with_a_short_last_window(hf, tmp_path):
    from flora_ext.accumulation import initial_accumulation_seed

    dense, dense_trainer = train(hf, training_args(tmp_path / "dense"), accumulation="dense")
    compressed, trainer = train(hf, training_args(tmp_path / "compressed"), accumulation=2)
    assert trainer.state.global_step == 6
    # One cycle per optimizer step, the one-micro-batch windows ending each epoch included:
    # every seed moved on six times.
    callback = trainer.callback_handler.callbacks[0]
    seeds = callback.state()["attributes"]["saved"]["accumulator"]["seeds"]
    assert len(seeds) == len(list(compressed.parameters()))
    for index, seed in seeds.items():
        expected = initial_accumulation_seed(0, int(index) + 1)
        for _ in range(6):
            expected = flora_ext.next_seed(expected)
        assert seed == expected, index
    # The first window's two micro-batches (same parameters as the dense run) were compressed:
    # the step's gradient is the rank-2 estimate, not the sum.
    norm, dense_norm = logged(trainer, "grad_norm")[0], logged(dense_trainer, "grad_norm")[0]
    assert norm > 0 and norm != pytest.approx(dense_norm, rel=1e-3)
    assert not any(torch.equal(p, q) for p, q in zip(dense.parameters(), compressed.parameters())
                   if p.dim() == 2)


def test_bf16_accumulation_buffers_through_the_callback(hf, tmp_path):
    """buffer_dtype reaches the accumulator: bf16 buffers give a different (rounded) but
    close run, and the checkpoint records the dtype by name, which the callback accepts."""
    fp32, _ = train(hf, training_args(tmp_path / "fp32"), accumulation=2)
    bf16, trainer = train(hf, training_args(tmp_path / "bf16"), accumulation=2,
                          buffer_dtype=torch.bfloat16)
    callback = trainer.callback_handler.callbacks[0]
    args = callback.state()["args"]
    assert args["buffer_dtype"] == "bfloat16"
    assert hf.FloraAccumulationCallback(**args).buffer_dtype == torch.bfloat16
    assert hf.FloraAccumulationCallback(rank=2, buffer_dtype="uint8").buffer_dtype == torch.uint8
    moved = [(p, q) for p, q in zip(fp32.parameters(), bf16.parameters()) if p.dim() == 2]
    assert not all(torch.equal(p, q) for p, q in moved)
    for p, q in moved:
        assert (p - q).norm() <= 1e-2 * p.norm()
    with pytest.raises(ValueError, match="flora: buffer_dtype must be torch.float32, "
                                         "torch.bfloat16 or torch.uint8 .8-bit blockwise., "
                                         "got torch.float16"):
        hf.FloraAccumulationCallback(rank=2, buffer_dtype=torch.float16)
    with pytest.raises(TypeError, match="flora: buffer_dtype must be a torch.dtype"):
        hf.FloraAccumulationCallback(rank=2, buffer_dtype="half")


def test_grouped_steps_through_the_callback(hf, tmp_path):
    """step_group_bytes reaches the accumulator: the same steps (bitwise), fewer calls, and
    the checkpoint's args carry it."""
    alone, _ = train(hf, training_args(tmp_path / "alone"), accumulation=2)
    grouped, trainer = train(hf, training_args(tmp_path / "grouped"), accumulation=2,
                             step_group_bytes=1 << 30)
    callback = trainer.callback_handler.callbacks[0]
    flora = hf._unwrap_flora(trainer.optimizer)
    # one call per param group (Trainer's decay and no-decay groups)
    sizes = sorted(len(key) for key in flora._param_plans)
    assert sizes == sorted(len(g["params"]) for g in flora.param_groups)
    assert sum(sizes) == len(list(grouped.parameters()))
    assert callback.state()["args"]["step_group_bytes"] == 1 << 30
    assert hf.FloraAccumulationCallback(**callback.state()["args"]).step_group_bytes == 1 << 30
    for p, q in zip(alone.parameters(), grouped.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="flora: step_group_bytes must be an int >= 0"):
        hf.FloraAccumulationCallback(rank=2, step_group_bytes=-1)


def test_overlapped_steps_through_the_callback(hf, tmp_path):
    """overlap_steps reaches the accumulator and the checkpoint's args; the same steps."""
    alone, _ = train(hf, training_args(tmp_path / "alone"), accumulation=2)
    overlapped, trainer = train(hf, training_args(tmp_path / "overlapped"), accumulation=2,
                                overlap_steps=True)
    callback = trainer.callback_handler.callbacks[0]
    assert callback.accumulator is None or callback.accumulator._overlap
    assert callback.state()["args"]["overlap_steps"] is True
    assert hf.FloraAccumulationCallback(**callback.state()["args"]).overlap_steps is True
    for p, q in zip(alone.parameters(), overlapped.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="flora: overlap_steps must be a bool"):
        hf.FloraAccumulationCallback(rank=2, overlap_steps=1)


def test_clipping_and_other_optimizers_are_refused(hf, tmp_path):
    with pytest.raises(ValueError, match=r"gradient clipping \(max_grad_norm=1.0\) cannot act.*"
                                         r"set max_grad_norm=0"):
        train(hf, training_args(tmp_path, max_grad_norm=1.0), accumulation=4)
    from transformers import Trainer

    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenData())
    hf.add_flora_accumulation(trainer)
    with pytest.raises(TypeError, match="needs Trainer's optimizer to be a flora_ext.Flora"):
        trainer.train()
    with pytest.raises(ValueError, match="rank must be None"):
        hf.FloraAccumulationCallback(rank=0)


def test_resume_restores_the_accumulation_seeds(hf, tmp_path):
    args = training_args(tmp_path, save_strategy="steps", save_steps=2)
    full, trainer = train(hf, args, accumulation=2)
    checkpoint = tmp_path / "checkpoint-2"
    saved = trainer.state.stateful_callbacks  # at the end: seeds after 6 steps
    assert saved["FloraAccumulationCallback"]["attributes"]["saved"]["global_step"] == 6
    resumed, resumed_trainer = train(hf, args, accumulation=2, resume=str(checkpoint))
    assert resumed_trainer.state.global_step == 6
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def _trainer_across_processes(rank, world, out_dir):
    """Trainer under 2 gloo processes (DDP on the CPU): its own accumulation, and the
    callback's dense and compressed accumulation. Returns what the parent compares."""
    import os

    from accelerate.state import AcceleratorState, GradientState

    from flora_ext.integrations import hf

    results = {}
    for name, accumulation in (("plain", None), ("dense", "dense"), ("compressed", 2)):
        try:
            args = training_args(os.path.join(out_dir, name), ddp_backend="gloo")
            model, trainer = train(hf, args, accumulation=accumulation)
            results[name] = dict(
                params=[p.detach().clone() for p in model.parameters()],
                steps=trainer.state.global_step, grad_norm=logged(trainer, "grad_norm"),
                wrapped=type(trainer.model_wrapped).__name__, world_size=args.world_size,
                ddp_sync=getattr(trainer.model_wrapped, "require_backward_grad_sync", None))
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    return results


def test_accumulation_under_ddp_trainer(hf, tmp_path):
    """The callback under a 2-process Trainer: dense accumulation gives Trainer's own DDP
    accumulation (the mean over the ranks of each window's sum), compressed accumulation
    keeps the ranks identical, and DDP's reduction is back on once training ends."""
    from dist_utils import spawn_workers

    ranks = spawn_workers(_trainer_across_processes, nprocs=2, args=(str(tmp_path),),
                          timeout_s=120)
    for result in ranks:
        for name, run in result.items():
            assert run["wrapped"] == "DistributedDataParallel" and run["world_size"] == 2, name
            assert run["ddp_sync"] is True, name  # the accumulator was removed at the end
            # 5 samples a rank: micro-batches of 2, 2, 1, windows of 2 and 1; two epochs
            assert run["steps"] == 4, name
    plain, dense, compressed = (ranks[0][name] for name in ("plain", "dense", "compressed"))
    for name in ("plain", "dense", "compressed"):
        for p, q in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
            assert torch.equal(p, q), name
    for p, q in zip(dense["params"], plain["params"]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert dense["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    assert len(compressed["grad_norm"]) == 4 and min(compressed["grad_norm"]) > 0
    assert not any(torch.equal(p, q) for p, q in zip(compressed["params"], dense["params"])
                   if p.dim() == 2)


def test_multi_process_runs_need_the_trainer_and_ddp(hf, tmp_path):
    """What the callback refuses in a run of several processes, checked on the arguments
    alone (the 2-process run above covers the supported case)."""
    from types import SimpleNamespace

    args = SimpleNamespace(world_size=2, n_gpu=1)
    with pytest.raises(ValueError, match=r"needs Trainer's DistributedDataParallel model: add "
                                         r"the callback with add_flora_accumulation\(trainer"):
        hf.FloraAccumulationCallback(rank=4)._ddp_model(args)
    class Trainer:  # what the callback reads of a trainer
        model_wrapped = torch.nn.Linear(2, 2)

    trainer = Trainer()
    with pytest.raises(NotImplementedError, match="wraps the model in Linear"):
        hf.FloraAccumulationCallback(rank=4, trainer=trainer)._ddp_model(args)
    assert hf.FloraAccumulationCallback(trainer=trainer)._ddp_model(
        SimpleNamespace(world_size=1, n_gpu=1)) is None
    with pytest.raises(NotImplementedError, match="DataParallel"):
        hf.FloraAccumulationCallback._check_args(SimpleNamespace(
            max_grad_norm=0.0, fp16=False, world_size=1, n_gpu=2))


# ---------------------------------------------------------------- accelerate
def test_flora_accelerator_refuses_clipping_hooked_parameters():
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = flora_ext.FloraAccelerator(cpu=True, gradient_accumulation_steps=2)
        model = torch.nn.Linear(8, 4)
        other = torch.nn.Linear(8, 4)
        model, _ = accelerator.prepare(model, flora_ext.Flora(model.parameters(), **FLORA))
        for clip in (lambda ps: accelerator.clip_grad_norm_(ps, 1.0),
                     lambda ps: accelerator.clip_grad_norm_(ps, float("inf")),
                     lambda ps: accelerator.clip_grad_value_(ps, 1.0)):
            with pytest.raises(ValueError, match="no gradient is left to clip"):
                clip(model.parameters())
        # parameters no accumulator steps are clipped as ever
        other(torch.randn(2, 8)).pow(2).sum().mul(100).backward()
        norm = accelerator.clip_grad_norm_(other.parameters(), 1.0)
        assert norm > 1.0
        clipped = torch.cat([p.grad.flatten() for p in other.parameters()]).norm()
        assert clipped == pytest.approx(1.0, rel=1e-4)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
