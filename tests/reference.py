"""Plain float64 reference of one Flora step, written from docs/FLORA.md.

Nothing here is fast or clever on purpose: every formula of docs/FLORA.md ("Which state a parameter
gets", "One step for one parameter", "Projections") appears once, in the order the document
gives it, on float64 tensors. The tests compare the extension's kernels against this file.

State names follow the extension's ``opt.state[p]`` keys:
  step (int), row_second_moment (n,), col_second_moment (m,)   if factored
              second_moment (like the parameter)               otherwise
              momentum (r x m if n < m else n x r when compressed; like the parameter when dense)
              seed (int)                                       only with compressed momentum

Hyper-parameters (``hp``) are a dict with the keys of ``DEFAULT_HP``.
"""

import math

import torch

MASK64 = (1 << 64) - 1
MASK63 = (1 << 63) - 1

# flora-opt's argument defaults (docs/FLORA.md, "Arguments").
DEFAULT_HP = dict(
    lr=None,
    rank=None,
    kappa=1000,
    eps=(1e-30, 1e-3),
    clip_threshold=1.0,
    decay_rate=-0.8,
    beta1=None,
    weight_decay=0.0,
    scale_parameter=True,
    relative_step=False,
    warmup_init=False,
    factorize_second_moment=True,
)


# flora_ext's own hyper-parameters that change the math, which flora-opt does not take: an
# hp holds them only when given (so that DEFAULT_HP's hp also builds flora-opt's Flora).
EXTENSION_HP = dict(max_aspect_ratio=4.0)


def full_hp(**overrides):
    """DEFAULT_HP with ``overrides`` applied (unknown keys are an error)."""
    unknown = set(overrides) - set(DEFAULT_HP) - set(EXTENSION_HP)
    if unknown:
        raise KeyError(f"unknown hyper-parameters: {sorted(unknown)}")
    hp = dict(DEFAULT_HP)
    hp.update(overrides)
    return hp


def optimizer_kwargs(hp, seed=0):
    """Constructor arguments of flora_ext.Flora (and flora-opt's Flora) for ``hp``:
    the hyper-parameter names are the constructor's, plus the base seed."""
    return dict(hp, seed=seed)


# --------------------------------------------------------------------------- seeds


def next_seed(s):
    """The seed that follows ``s``: the splitmix64 finalizer, cut to 63 bits."""
    z = (s + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z & MASK63


def param_seed(base_seed, index):
    """Seed of parameter number ``index`` (1-based, over all param groups in order)."""
    return base_seed + index


# --------------------------------------------------------------------------- projections


def ext_projection(seed, rows, cols, rank):
    """The extension's projection (float32, N(0,1)/sqrt(rank) entries), as float64."""
    import flora_ext

    return flora_ext.projection(seed, rows, cols, rank, device="cpu").to(torch.float64)


def projection_matrix(projection, seed, n, m, rank):
    """P for an n x m parameter: r x n (left, n < m) or m x r (right, n >= m)."""
    if n < m:
        return projection(seed, rank, n, rank)
    return projection(seed, m, rank, rank)


def down(P, X, left):
    """Compress an n x m matrix: P X (r x m) on the left, X P (n x r) on the right."""
    return P @ X if left else X @ P


def up(P, C, left):
    """Decompress back to n x m: P^T C on the left, C P^T on the right."""
    return P.t() @ C if left else C @ P.t()


PROJECTIONS = ("gaussian", "orthogonal")


def basis_matrix(P, left, projection="gaussian"):
    """The matrix that ``down`` and ``up`` use (docs/FLORA.md §5.1): P itself ("gaussian"),
    or ("orthogonal") P_o = s R^-T P on the left and P R^-1 s on the right, R the upper
    Cholesky factor of the r x r Gram (P P^T = R^T R on the left, P^T P on the right) and
    s^2 = long / r for P's long side: P's r long vectors orthonormalised in order
    (Gram-Schmidt) and scaled by s, so up(down(X)) = s^2 times the orthogonal projection of
    X on P's row (left) or column (right) space. The momentum is kept in P_o's coordinates."""
    if projection == "gaussian":
        return P
    if projection != "orthogonal":
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    A = (P if left else P.t()).to(torch.float64)  # r x long
    r, long = A.shape
    L = torch.linalg.cholesky(A @ A.t())  # R^T
    A_o = torch.linalg.solve_triangular(L, A, upper=False) * math.sqrt(long / r)
    return A_o if left else A_o.t()


# --------------------------------------------------------------------------- layout and state


def layout(shape, rank, beta1, factorize_second_moment, max_aspect_ratio=4.0):
    """Which state a parameter of ``shape`` gets (docs/FLORA.md, "Which state a parameter gets");
    max_aspect_ratio None: no limit on max(n, m) / min(n, m)."""
    shape = tuple(shape)
    factored = len(shape) == 2 and bool(factorize_second_moment)
    use_momentum = beta1 is not None and beta1 > 0
    compressed = False
    if use_momentum and rank is not None and rank > 0 and factored:
        n, m = shape
        compressed = min(n, m) >= rank and (
            max_aspect_ratio is None or max(n, m) <= max_aspect_ratio * min(n, m))
    left = len(shape) == 2 and shape[0] < shape[1]
    if compressed:
        momentum = "compressed"
        momentum_shape = (rank, shape[1]) if left else (shape[0], rank)
    elif use_momentum:
        momentum = "dense"
        momentum_shape = shape
    else:
        momentum = "none"
        momentum_shape = None
    return dict(factored=factored, momentum=momentum, left=left, momentum_shape=momentum_shape)


def layout_for(shape, hp):
    return layout(shape, hp["rank"], hp["beta1"], hp["factorize_second_moment"],
                  hp.get("max_aspect_ratio", EXTENSION_HP["max_aspect_ratio"]))


def init_state(param, hp, seed):
    """Fresh float64 state for ``param``; ``seed`` is this parameter's projection seed."""
    lay = layout_for(param.shape, hp)
    z = dict(dtype=torch.float64, device="cpu")
    state = {"step": 0}
    if lay["factored"]:
        n, m = param.shape
        state["row_second_moment"] = torch.zeros(n, **z)
        state["col_second_moment"] = torch.zeros(m, **z)
    else:
        state["second_moment"] = torch.zeros(tuple(param.shape), **z)
    if lay["momentum"] != "none":
        state["momentum"] = torch.zeros(lay["momentum_shape"], **z)
    if lay["momentum"] == "compressed":
        state["seed"] = int(seed)
    return state


# --------------------------------------------------------------------------- one step


def rms(x):
    return (x.norm() / math.sqrt(x.numel())).item()


def max_nan(a, b):
    """max(a, b), NaN when either is NaN (Python's max returns an operand whatever the
    comparison, so max(1.0, nan) is 1.0): docs/FLORA.md §4.7."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def step_size(hp, t, param_rms):
    """lr_t of docs/FLORA.md step 1."""
    if hp["relative_step"]:
        first = 1e-6 * t if hp["warmup_init"] else 1e-2
        lr = min(first, 1.0 / math.sqrt(t))
    else:
        if hp["lr"] is None:
            raise ValueError("lr is required unless relative_step")
        lr = hp["lr"]
    if hp["scale_parameter"]:
        lr = lr * max_nan(hp["eps"][1], param_rms)
    return lr


def skipped_step(param64, state, hp, projection=ext_projection, next_seed_fn=next_seed,
                 down_projection="gaussian"):
    """skip_nonfinite's step of a parameter whose gradient is not finite (docs/FLORA.md
    §4.8): the step count advances, the parameter and its state stay, but compressed
    momentum moves to the next basis on a resampling step, with nothing added."""
    state["step"] += 1
    lay = layout_for(param64.shape, hp)
    if lay["momentum"] == "compressed" and state["step"] % hp["kappa"] == 0:
        n, m = param64.shape
        r, left, s = hp["rank"], lay["left"], state["seed"]
        P = basis_matrix(projection_matrix(projection, s, n, m, r), left, down_projection)
        s_new = next_seed_fn(s)
        P_new = basis_matrix(projection_matrix(projection, s_new, n, m, r), left,
                             down_projection)
        state["momentum"].copy_(down(P_new, up(P, state["momentum"], left), left))
        state["seed"] = s_new
    return param64.to(torch.float64).clone()


TRANSFERS = ("flora_opt", "norm_preserving", "least_squares", "reset")


def transfer_scale(transfer, up_old, up_new):
    """The factor c of the momentum carried into a new basis, M = c down_s'(up_s(M)):
    1 (flora-opt), ||up_s(M)|| / ||up_s'(down_s'(up_s(M)))|| (norm_preserving: the step sees a
    momentum of the same norm before and after the resample), <up_s'(.), up_s(M)> /
    ||up_s'(.)||^2 (least_squares: the multiple of the moved momentum closest to the old one),
    or 0 (reset)."""
    if transfer == "flora_opt":
        return 1.0
    if transfer == "reset":
        return 0.0
    if transfer == "norm_preserving":
        after = up_new.norm().item()
        return up_old.norm().item() / after if after > 0 else 1.0
    if transfer == "least_squares":
        after = (up_new * up_new).sum().item()
        return (up_new * up_old).sum().item() / after if after > 0 else 1.0
    raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")


def reference_step(param64, grad64, state, hp, projection=ext_projection, next_seed_fn=next_seed,
                   skip_nonfinite=False, transfer="flora_opt", down_projection="gaussian"):
    """One Flora step in float64. Updates ``state`` in place and returns the new parameter.

    ``projection(seed, rows, cols, rank)`` gives the projection matrices (the extension's by
    default); ``next_seed_fn`` the seed sequence (splitmix64 by default). Both are arguments so
    that the same formulas can be run with flora-opt's projections. ``skip_nonfinite``: a
    gradient with a NaN or inf gives skipped_step instead. ``transfer`` picks how the
    momentum moves to a new basis (``transfer_scale``; flora-opt's by default).
    ``down_projection`` is the optimizer's ``projection`` ("gaussian" or "orthogonal",
    ``basis_matrix``: the basis both down and up use, and the momentum's coordinates);
    ``projection`` here is the generator of P.
    """
    if skip_nonfinite and not torch.isfinite(grad64).all():
        return skipped_step(param64, state, hp, projection, next_seed_fn, down_projection)
    p = param64.to(torch.float64).clone()
    G = grad64.to(torch.float64)
    lay = layout_for(p.shape, hp)
    eps1, _ = hp["eps"]

    # 1. step count, parameter RMS, step size
    state["step"] += 1
    t = state["step"]
    lr_t = step_size(hp, t, rms(p))

    # 2. second-moment decay
    beta2 = 1.0 - t ** hp["decay_rate"]

    # 3. second moment and the preconditioned gradient U
    V = G * G + eps1
    if lay["factored"]:
        row = state["row_second_moment"]
        col = state["col_second_moment"]
        row.mul_(beta2).add_((1.0 - beta2) * V.mean(dim=1))
        col.mul_(beta2).add_((1.0 - beta2) * V.mean(dim=0))
        row_factor = torch.rsqrt(row / row.mean())
        col_factor = torch.rsqrt(col)
        U = G * row_factor[:, None] * col_factor[None, :]
    else:
        S = state["second_moment"]
        S.mul_(beta2).add_((1.0 - beta2) * V)
        U = G * torch.rsqrt(S)

    # 4. momentum
    beta1 = hp["beta1"]
    if lay["momentum"] == "none":
        D = U
    elif lay["momentum"] == "dense":
        D = (1.0 - beta1) * U + beta1 * state["momentum"]
        state["momentum"].copy_(D)
    else:
        n, m = p.shape
        r = hp["rank"]
        left = lay["left"]
        s = state["seed"]
        P = basis_matrix(projection_matrix(projection, s, n, m, r), left, down_projection)
        M = state["momentum"]
        # a. this step's direction, from the momentum before its update
        D = (1.0 - beta1) * U + beta1 * up(P, M, left)
        # b. every kappa steps: move the momentum to a fresh basis
        if t % hp["kappa"] == 0:
            s_new = next_seed_fn(s)
            P_new = basis_matrix(projection_matrix(projection, s_new, n, m, r), left,
                                 down_projection)
            up_old = up(P, M, left)
            moved = down(P_new, up_old, left)
            M.copy_(transfer_scale(transfer, up_old, up(P_new, moved, left)) * moved)
            state["seed"] = s_new
            P = P_new
        # c. accumulate this step's U (in the possibly new basis)
        M.copy_(beta1 * M + (1.0 - beta1) * down(P, U, left))

    # 5. update clipping
    D = D / max_nan(1.0, rms(D) / hp["clip_threshold"])

    # 6. decoupled weight decay, then the update
    if hp["weight_decay"]:
        p = p - hp["weight_decay"] * lr_t * p
    p = p - lr_t * D
    return p
