"""Multi-process test helpers: run a function on N gloo ranks, with a timeout that fails.

    results = spawn_workers(fn, nprocs=2, args=(device,), timeout_s=120)

``fn(rank, world_size, *args)`` must be a module-level function (the children import it by
name). Each child initialises a gloo process group over a free local port, runs ``fn`` and
sends back its return value (torch.save) or its traceback; the parent raises
WorkerFailed with every failed rank's traceback (a rank that crashed leaves the Python stack
of its crash, from faulthandler), or WorkerTimeout (after killing the children) when they do
not all finish in time, so a hang fails instead of stalling. Once a rank fails the others
get a moment to report and are then killed: they may be waiting on it forever.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import socket
import tempfile
import time
import traceback

import torch


class WorkerFailed(AssertionError):
    pass


class WorkerTimeout(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, out_dir, args, backend):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    fault_log = open(os.path.join(out_dir, f"fault{rank}.txt"), "w")  # noqa: SIM115
    faulthandler.enable(file=fault_log)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
            dist.barrier()  # no rank leaves (closing its connections) while another works
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise SystemExit(1)


def spawn_workers(fn, nprocs=2, args=(), timeout_s=120.0, backend="gloo"):
    """Runs ``fn(rank, nprocs, *args)`` on ``nprocs`` spawned processes; returns their
    return values by rank."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_child, args=(fn, r, nprocs, port, out_dir, args, backend),
                             daemon=True) for r in range(nprocs)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if all(p.exitcode is not None for p in procs):
                    break
                if any(p.exitcode not in (None, 0) for p in procs):
                    time.sleep(2)  # let the others write their errors
                    break
                procs[0].join(0.1)
            failed = any(p.exitcode not in (None, 0) for p in procs)
            alive = [r for r, p in enumerate(procs) if p.is_alive()]
            if alive and not failed:
                raise WorkerTimeout(f"ranks {alive} of {nprocs} did not finish within "
                                    f"{timeout_s:.0f} s (hang?); killed"
                                    + _report(out_dir, nprocs))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results, errors = [], []
        for r in range(nprocs):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                code = "killed" if r in alive else f"exited with code {procs[r].exitcode}"
                errors.append(f"rank {r}: {code}, no result" + _fault(out_dir, r))
                continue
            record = torch.load(path, weights_only=False)
            if record["ok"]:
                results.append(record["result"])
            else:
                errors.append(f"rank {r}:\n{record['error']}")
        if errors:
            raise WorkerFailed("\n".join(errors))
        return results


def _fault(out_dir, rank):
    path = os.path.join(out_dir, f"fault{rank}.txt")
    text = open(path).read().strip() if os.path.exists(path) else ""
    return f"\n{text}" if text else ""


def _report(out_dir, nprocs):
    lines = []
    for r in range(nprocs):
        path = os.path.join(out_dir, f"rank{r}.pt")
        if os.path.exists(path):
            record = torch.load(path, weights_only=False)
            if not record["ok"]:
                lines.append(f"\nrank {r} failed:\n{record['error']}")
    return "".join(lines)
