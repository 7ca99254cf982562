import sys, os, time, torch
sys.path.insert(0, "benchmarks")
from bench_step import MODELS, llama_shapes, make_params
import flora_ext
dtype = getattr(torch, sys.argv[1])
params, grads = make_params(llama_shapes(*MODELS["1.35b"]), dtype)
opt = flora_ext.Flora(params, lr=1e-3, beta1=None)
for p, g in zip(params, grads): p.grad = g
for _ in range(3): opt.step()
torch.cuda.synchronize()
if len(sys.argv) > 2:  # host breakdown: op call alone vs whole step
    import flora_ext.optimizer as fo
    real = torch.ops.flora.step_group_
    op_t = []
    class Timed:
        def __call__(self, *a, **k):
            t = time.perf_counter(); real(*a, **k); op_t.append(time.perf_counter() - t)
    orig = torch.ops.flora
    step_t = []
    for _ in range(30):
        torch.cuda._sleep(50_000_000)
        t = time.perf_counter(); opt.step(); step_t.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    import statistics as st
    fo_torch = fo.torch
    class Ops:  # a stand-in namespace timing the op call
        flora = type("F", (), {"step_group_": Timed()})()
    class T:
        def __getattr__(self, n): return Ops if n == "ops" else getattr(torch, n)
    fo.torch = T()
    for _ in range(30):
        torch.cuda._sleep(50_000_000)
        opt.step()
        torch.cuda.synchronize()
    fo.torch = fo_torch
    print(f"{sys.argv[1]} host: step {st.median(step_t)*1e3:.3f} ms, op call {st.median(op_t)*1e3:.3f} ms "
          f"(python {1e3*(st.median(step_t)-st.median(op_t)):.3f} ms)")
else:
    opt.step()
    torch.cuda.synchronize()
