"""SHA-256 of parameters and state after a fixed run of Flora steps, to compare two builds
bit for bit (a kernel change that must not move a result):

    for tree in /path/to/a /path/to/b; do PYTHONPATH=$tree python tools/step_digest.py; done

The run covers the fused path (tf32=True, float32 and bfloat16), exact GEMMs (tf32=False),
an unfusable shape, a dense 1-D tensor and two resamples (kappa 2, 5 steps).
"""
import argparse
import hashlib

import torch

import flora_ext

SHAPES = [(256, 1024), (1024, 512), (96, 200), (90, 204), (37,)]
SETTINGS = [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)]


def digest(device, projection):
    gen = torch.Generator().manual_seed(0)
    h = hashlib.sha256()
    for tf32, dtype in SETTINGS:
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype))
              for s in SHAPES]
        # the default projection not named: a tree without the option runs too
        extra = {} if projection == "gaussian" else {"projection": projection}
        opt = flora_ext.Flora(ps, lr=1e-2, beta1=0.9, rank=32, kappa=2, tf32=tf32, **extra)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
            opt.step()
        for p in ps:
            h.update(p.detach().float().cpu().numpy().tobytes())
            for key in sorted(opt.state[p]):
                value = opt.state[p][key]
                if torch.is_tensor(value):
                    h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--projection", default="gaussian", choices=["gaussian", "orthogonal"])
    args = ap.parse_args()
    print(args.projection, args.device, digest(args.device, args.projection))


if __name__ == "__main__":
    main()
