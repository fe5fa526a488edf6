"""Measure this machine: matmul throughput, memory bandwidth, collectives; write a profile.

Two halves:

* the *worker* (``python -m autoplan.profiler.measure --out raw.json``), run by ``torchrun`` on
  every rank: CPU ranks over gloo, or one GPU per rank over NCCL when CUDA is present. Matmuls
  and copies run on all ranks at once (that is what a rank sees during training: on a CPU the
  ranks share the cores), collectives on the whole group and on sub-groups (the axes of the
  meshes the ranks can form). Rank 0 prints progress lines and writes the raw JSON.
* the *driver* (``run_profile``): launches ``python -m torch.distributed.run --standalone``,
  follows the progress, and turns the raw numbers into a profile (``build_profile``) in the
  schema of ``profiles/*.yaml`` plus a ``measured:`` section with the curves.

Timings are wall-clock medians/means over a few repetitions after one warm-up; on a shared
2-core machine they are noisy, and the profile says so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

PROGRESS_TAG = "@@autoplan-progress"
KIB, MIB = 1024, 1024 * 1024

# (m, k, n) shapes; dtype -> shapes. Squares trace the curve, rectangles are transformer-like.
MATMUL_SHAPES = {
    "quick": {"fp32": [(64, 64, 64), (128, 128, 128), (256, 256, 256)], "bf16": [(64, 64, 64), (128, 128, 128)]},
    "cpu": {
        "fp32": [(64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024),
                 (2048, 2048, 2048), (2048, 384, 1536), (2048, 1536, 384), (512, 768, 3072)],
        "bf16": [(64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024),
                 (2048, 384, 1536), (2048, 1536, 384)],
    },
    "cuda": {
        "fp32": [(256, 256, 256), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192)],
        "bf16": [(256, 256, 256), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192),
                 (16384, 4096, 4096), (8192, 4096, 16384)],
    },
}
# (batch, heads, seq, head_dim) of causal fused attention, timed forward + backward
ATTENTION_SHAPES = {
    "quick": [(1, 4, 128, 32), (2, 4, 256, 64)],
    "cpu": [(1, 4, 128, 32), (2, 4, 128, 32), (2, 8, 256, 64), (2, 16, 512, 64)],
    "cuda": [(1, 16, 1024, 64), (4, 16, 2048, 128), (8, 32, 4096, 128)],
}
COPY_SIZES = {"quick": [1 * MIB, 4 * MIB], "cpu": [4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB],
              "cuda": [16 * MIB, 64 * MIB, 256 * MIB, 1024 * MIB]}
COLL_SIZES = {"quick": [4 * KIB, 64 * KIB, 1 * MIB],
              "cpu": [4 * KIB * 4**i for i in range(8)],  # 4 KiB .. 64 MiB
              "cuda": [4 * KIB * 4**i for i in range(10)]}  # 4 KiB .. 1 GiB
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
BUDGET_S = {"quick": 0.01, "cpu": 0.25, "cuda": 0.1}  # time per measurement (after warm-up)
MAX_REPS = {"quick": 3, "cpu": 20, "cuda": 50}
CHUNK_MM = 256  # square matmul between collectives on CPU ranks: ~1 ms per rank with 4 ranks on 2 cores
MIN_COLLECTIVE_S = 1e-6  # a difference of two noisy timings is kept positive
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ----------------------------------------------------------------------------------------------
# worker (runs on every rank under torchrun)


class _Worker:
    def __init__(self, quick: bool) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.cuda = torch.cuda.is_available()
        self.mode = "quick" if quick else ("cuda" if self.cuda else "cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.cuda:
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        backend = "nccl" if self.cuda else "gloo"
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=120))
        self.backend = backend
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.step, self.total = 0, 0
        self._chunk: Callable[[], Any] | None = None  # compute between collectives (``in_step``)
        self._chunk_s: dict[Any, float] = {}

    # -- helpers
    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def scalar(self, x: float, op: str, group=None) -> float:
        t = self.torch.tensor([float(x)], dtype=self.torch.float64 if not self.cuda else self.torch.float32,
                              device=self.device)
        self.dist.all_reduce(t, op=getattr(self.dist.ReduceOp, op), group=group)
        return float(t.item())

    def gather(self, x: float) -> list[float]:
        t = self.torch.zeros(self.world, dtype=self.torch.float32, device=self.device)
        t[self.rank] = x
        self.dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def barrier(self, group=None) -> None:
        self.scalar(0.0, "SUM", group)

    def progress(self, label: str) -> None:
        self.step += 1
        if self.rank == 0:
            print(f"{PROGRESS_TAG} {self.step} {self.total} {label}", flush=True)

    def timed(self, fn: Callable[[], Any], group=None, combine: str = "max") -> float:
        """Seconds per call of ``fn``: one warm-up, then reps chosen so the run lasts ~BUDGET_S.

        ``combine``: "max" over the group (a collective ends when its slowest rank does) or
        "median" over all ranks (independent per-rank work such as a matmul).
        """
        self.barrier(group)
        t0 = time.perf_counter()
        fn()
        self.sync()
        warm = self.scalar(time.perf_counter() - t0, "MAX", group)
        reps = int(min(MAX_REPS[self.mode], max(1, math.ceil(BUDGET_S[self.mode] / max(warm, 1e-6)))))
        reps = max(reps, 2) if warm < 1.0 else reps
        self.barrier(group)
        t0 = time.perf_counter()
        if combine == "median" and not self.cuda:
            # CPU ranks share cores: every rank runs for the same wall time, so all of them compete for
            # the whole measurement (a fixed count would let the first to finish free a core for the rest)
            budget, done = max(BUDGET_S[self.mode], reps * warm), 0
            while done < 2 or time.perf_counter() - t0 < budget:
                fn()
                done += 1
            mine = (time.perf_counter() - t0) / done
        else:
            for _ in range(reps):
                fn()
            self.sync()
            mine = (time.perf_counter() - t0) / reps
        if combine == "max":
            return self.scalar(mine, "MAX", group)
        vals = sorted(self.gather(mine))
        return vals[len(vals) // 2] if len(vals) % 2 else 0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2])

    # -- plan and run
    def group_sizes(self) -> list[int]:
        """Axis sizes of the meshes these ranks form: the whole world, and its proper power-of-2 factors >= 2."""
        sizes = [self.world]
        g = 2
        while g < self.world:
            if self.world % g == 0:
                sizes.append(g)
            g *= 2
        return sizes

    def run(self) -> dict[str, Any]:
        torch = self.torch
        shapes = dict(MATMUL_SHAPES[self.mode])
        if self.cuda and self.mode == "quick":
            shapes = {"fp32": [(256, 256, 256), (1024, 1024, 1024)], "bf16": [(256, 256, 256), (1024, 1024, 1024)]}
        if self.cuda:
            shapes["fp16"] = shapes["bf16"]  # GPU plans may compute in fp16 (CPU profiles, like cpu.yaml, have none)
        copies = COPY_SIZES[self.mode]
        csizes = COLL_SIZES[self.mode]
        gsizes = self.group_sizes() if self.world > 1 else []
        att = ATTENTION_SHAPES[self.mode]
        self.total = sum(len(v) for v in shapes.values()) + len(att) * len(shapes) + len(copies) + len(gsizes) * len(KINDS) * len(csizes)
        self.total += len(csizes) if self.world > 1 else 0
        self.total += 4  # DTensor dispatch, optimizer per tensor, per-op runtime vs native, planned move
        out: dict[str, Any] = {
            "meta": {
                "world": self.world, "backend": self.backend, "device": self._device_name(),
                "threads_per_rank": torch.get_num_threads(), "torch": torch.__version__, "mode": self.mode,
                "host": socket.gethostname(), "cpu_count": os.cpu_count(), "memory_bytes": self._memory_bytes(),
            },
            "matmul": {}, "memory": [], "collectives": {},
        }
        for dname, shp in shapes.items():
            dt = getattr(torch, DTYPES[dname])
            rows = []
            for m, k, n in shp:
                self.progress(f"matmul {dname} {m}x{k}x{n}")
                a = torch.randn(m, k, device=self.device).to(dt)
                b = torch.randn(k, n, device=self.device).to(dt)
                s = self.timed(lambda: torch.mm(a, b), combine="median")
                flops = 2.0 * m * k * n
                rows.append({"shape": [m, k, n], "flops": flops, "seconds": s, "flops_per_s": flops / s})
            out["matmul"][dname] = rows
        out["attention"] = {dname: self._attention(dname, att) for dname in shapes}
        for size in copies:
            self.progress(f"memory copy {size // MIB} MiB")
            src = torch.empty(size // 4, dtype=torch.float32, device=self.device).fill_(1.0)
            dst = torch.empty_like(src)
            s = self.timed(lambda: dst.copy_(src), combine="median")
            out["memory"].append({"bytes": 2.0 * size, "seconds": s, "bytes_per_s": 2.0 * size / s})  # read + write
        for g in gsizes:
            group = None
            if g < self.world:
                group, _ = self.dist.new_subgroups(group_size=g)  # consecutive ranks: a mesh's inner axis
            res: dict[str, Any] = {}
            for kind in KINDS:
                res[kind] = self._collective(kind, g, group, csizes)
            out["collectives"][str(g)] = res
        if self.world > 1:
            out["collectives"].setdefault("2", {})["send_recv"] = self._send_recv(csizes)
        self.progress("DTensor dispatch per op")
        out["dispatch"] = self._dispatch()
        self.progress("optimizer step per parameter tensor")
        out["optimizer"] = self._optimizer()
        self.progress("per-op runtime vs native, one small GPT step")
        out["engine"] = self._engine()
        self.progress("per-op runtime: a planned move vs its collective")
        out["reshard"] = self._reshard()
        return out

    def _attention(self, dname: str, shapes: list[tuple[int, int, int, int]]) -> list[dict[str, Any]]:
        """Causal fused attention (``scaled_dot_product_attention``), forward + backward. The rate is
        per forward FLOP as the cost model counts them (QK^T and AV, no causal discount), times 3:
        the cost model prices backward as twice forward, so its 3 x forward is the measured time."""
        torch = self.torch
        import torch.nn.functional as F

        dt = getattr(torch, DTYPES[dname])
        rows = []
        for b, h, t, d in shapes:
            self.progress(f"attention {dname} {b}x{h}x{t}x{d}")
            q, k, v = (torch.randn(b, h, t, d, device=self.device).to(dt).requires_grad_() for _ in range(3))

            def step() -> None:
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                q.grad = k.grad = v.grad = None

            try:
                s = self.timed(step, combine="median")
            except (RuntimeError, NotImplementedError) as exc:  # a dtype this device's kernels lack
                self.progress(f"attention {dname}: skipped ({type(exc).__name__})")
                break
            flops = 4.0 * b * h * t * t * d
            rows.append({"shape": [b, h, t, d], "flops": flops, "seconds": s, "flops_per_s": 3.0 * flops / s})
        return rows

    def _optimizer(self, n: int = 32, numel: int = 256) -> dict[str, float]:
        """AdamW's step over ``n`` small parameters minus over one parameter of the same total size,
        per tensor: its fixed per-tensor cost, for plain tensors and for DTensors sharded over all ranks."""
        torch = self.torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        def per_step(params: list) -> float:
            for p in params:
                p.grad = torch.zeros_like(p)
            opt = torch.optim.AdamW(params, lr=1e-3)
            return self.timed(opt.step, combine="median")

        def make(k: int, size: int, mesh=None) -> list:
            if mesh is None:
                return [torch.nn.Parameter(torch.randn(size, device=self.device)) for _ in range(k)]
            return [torch.nn.Parameter(distribute_tensor(torch.randn(size * self.world, device=self.device), mesh, [Shard(0)]))
                    for _ in range(k)]

        one = per_step(make(1, n * numel))
        out = {"tensor_s": max(0.0, per_step(make(n, numel)) - one) / (n - 1)}
        if self.world > 1:
            mesh = init_device_mesh(self.device.type, (self.world,))
            one_d = per_step(make(1, n * numel, mesh))
            out["dtensor_s"] = max(0.0, per_step(make(n, numel, mesh)) - one_d) / (n - 1)
        return out

    def _engine(self, model: str = "gpt-tiny:layers=2") -> dict[str, float] | None:
        """Step time of a small GPT's DDP plan run by the per-op runtime and by the native recipe:
        the same collectives (one bucketed gradient all-reduce), so the difference per op is what
        the per-op runtime adds (its interpreter, DTensor dispatch, planned moves)."""
        torch = self.torch
        if self.world < 2 or self.device.type != "cpu":
            return None
        import autoplan
        from autoplan.models import resolve_model
        from autoplan.runtime.engine import apply

        spec = resolve_model(model)
        batch, seq = 2 * self.world, 32
        plan = autoplan.plan(model, cluster="cpu", devices=self.world, global_batch=batch, seq_len=seq,
                             dtype="fp32", baselines=False, force="ddp", micro_batches=[1], recompute=False)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 64, (batch, seq + 1), generator=g)
        inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        steps = {}
        for runtime in ("recipe", "per-op"):
            torch.manual_seed(0)
            pm = apply(spec.build(), plan, optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3), runtime=runtime)
            steps[runtime] = self.timed(lambda: pm.train_step(inputs, targets))
        ops = sum(1 for op in plan.ops)
        params = sum(1 for _ in spec.build().parameters())
        return {"per_op_step_s": steps["per-op"], "native_step_s": steps["recipe"], "ops": float(ops),
                "params": float(params)}

    def _reshard(self) -> dict[str, dict[str, float]] | None:
        """What a planned move of the per-op runtime (``runtime.moves.move``: DTensor, functional
        collectives, the pieces' copies) costs beyond the collective it issues, per group size (the
        inner axis of a (world / g, g) mesh, as the collectives are measured): all-to-all
        (S(0) -> S(1)), all-gather (S(0) -> R) and all-reduce (P -> R), each timed in a step
        (``in_step``) as the move and as the bare collective on the same bytes."""
        if self.world < 2 or self.device.type != "cpu":
            return None
        torch, dist = self.torch, self.dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

        from autoplan.runtime.moves import move

        out = {}
        for g in self.group_sizes():
            mesh = init_device_mesh("cpu", (self.world // g, g))
            group = mesh.get_group(1)
            keep = Replicate()
            sharded = distribute_tensor(torch.randn(32 * g, 32 * g), mesh, [keep, Shard(0)])
            partial = DTensor.from_local(torch.randn(32 * g, 32 * g), mesh, [keep, Partial()], run_check=False)
            local = sharded.to_local()
            recv, gathered, full = torch.empty_like(local), torch.empty(g * local.numel()), torch.randn(32 * g, 32 * g)
            pairs = {
                "all_to_all": (lambda: move(sharded, (keep, Shard(1))),
                               lambda: dist.all_to_all_single(recv, local, group=group)),
                "all_gather": (lambda: move(sharded, (keep, Replicate())),
                               lambda: dist.all_gather_into_tensor(gathered, local.reshape(-1), group=group)),
                "all_reduce": (lambda: move(partial, (keep, Replicate())), lambda: dist.all_reduce(full, group=group)),
            }
            row = {}
            for kind, (planned, bare) in pairs.items():
                row[f"{kind}_move_s"] = self.in_step(planned, group=group)
                row[f"{kind}_bare_s"] = self.in_step(bare, group=group)
            out[str(g)] = row
        return out

    def _dispatch(self, ops: int = 50) -> dict[str, float]:
        """Seconds per op of a chain of tiny elementwise ops (forward + backward), as plain tensors and
        as DTensors sharded over all ranks: the per-op runtime pays the difference for every op."""
        torch = self.torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh(self.device.type, (self.world,))
        local = torch.randn(4, 8, device=self.device, requires_grad=True)
        dt = distribute_tensor(torch.randn(4 * self.world, 8, device=self.device), mesh, [Shard(0)]).requires_grad_()

        def chain(x):
            y = x
            for _ in range(ops):
                y = y * 1.0001
            y.sum().backward()

        plain = self.timed(lambda: chain(local), combine="median") / ops
        dtensor = self.timed(lambda: chain(dt), combine="median") / ops
        return {"plain_op_s": plain, "dtensor_op_s": dtensor}

    def in_step(self, fn: Callable[[], Any], group=None) -> float:
        """Seconds ``fn`` (a collective) costs when issued between compute, as in a training step.

        On CPU ranks sharing cores, a rank waiting in a gloo collective spins for a while, taking
        CPU from the rank it waits for: a collective costs more between compute than back to back.
        So each call follows a matmul of about a millisecond on every rank (the compute between two
        collectives of a per-op step), and the matmul alone is subtracted. GPUs (NCCL on its own
        stream, no shared cores): timed back to back.
        """
        if self.cuda:
            return self.timed(fn, group=group)
        if self._chunk is None:
            a = self.torch.randn(CHUNK_MM, CHUNK_MM)
            b = self.torch.randn(CHUNK_MM, CHUNK_MM)
            self._chunk = lambda: self.torch.mm(a, b)  # noqa: E731
        if group not in self._chunk_s:
            self._chunk_s[group] = self.timed(self._chunk, group=group)
        chunk = self._chunk
        both = self.timed(lambda: (chunk(), fn()), group=group)
        return max(both - self._chunk_s[group], MIN_COLLECTIVE_S)

    def _collective(self, kind: str, g: int, group, sizes: list[int]) -> Any:
        torch, dist = self.torch, self.dist
        rows = []
        for size in sizes:
            self.progress(f"{kind} {g} ranks {_fmt_bytes(size)}")
            numel = max(g, (size // 4) // g * g)  # fp32 elements, divisible by the group size
            nbytes = numel * 4
            try:
                if kind == "all_reduce":
                    x = torch.ones(numel, device=self.device)
                    fn = lambda: dist.all_reduce(x, group=group)  # noqa: E731
                elif kind == "all_gather":  # buffer = gathered output (nccl-tests convention)
                    x, y = torch.ones(numel // g, device=self.device), torch.empty(numel, device=self.device)
                    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
                    fn = lambda: ag(y, x, group=group)  # noqa: E731
                elif kind == "reduce_scatter":  # buffer = scattered input
                    x, y = torch.ones(numel, device=self.device), torch.empty(numel // g, device=self.device)
                    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
                    fn = lambda: rs(y, x, group=group)  # noqa: E731
                else:  # all_to_all: the single-tensor form (gloo lacks the list form with uneven sizes)
                    x, y = torch.ones(numel, device=self.device), torch.empty(numel, device=self.device)
                    fn = lambda: dist.all_to_all_single(y, x, group=group)  # noqa: E731
                s = self.in_step(fn, group=group)
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                for _ in sizes[len(rows) + 1:]:
                    self.progress(f"{kind} {g} ranks (skipped)")
                return {"unsupported": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            rows.append({"bytes": float(nbytes), "seconds": s})
        return rows

    def _send_recv(self, sizes: list[int]) -> list[dict[str, float]]:
        """Ping-pong between ranks 2i and 2i+1, all pairs at once; one-way time = round trip / 2."""
        torch, dist = self.torch, self.dist
        partner = self.rank ^ 1
        if partner >= self.world:
            partner = None
        rows = []
        for size in sizes:
            self.progress(f"send/recv {_fmt_bytes(size)}")
            x = torch.ones(size // 4, device=self.device)

            def pingpong() -> None:
                if partner is None:
                    return
                if self.rank % 2 == 0:
                    dist.send(x, partner)
                    dist.recv(x, partner)
                else:
                    dist.recv(x, partner)
                    dist.send(x, partner)

            s = self.in_step(pingpong) / 2.0
            rows.append({"bytes": float(size), "seconds": s})
        return rows

    def _device_name(self) -> str:
        if self.cuda:
            return self.torch.cuda.get_device_name(self.device)
        return f"cpu-rank ({platform.processor() or platform.machine()})"

    def _memory_bytes(self) -> float:
        if self.cuda:
            return float(self.torch.cuda.get_device_properties(self.device).total_memory)
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return float(line.split()[1]) * 1024 / self.world
        except OSError:
            pass
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / self.world


def _fmt_bytes(n: float) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n / KIB:g} KiB"


def worker_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="autoplan profile worker (run under torchrun)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    w = _Worker(args.quick)
    try:
        result = w.run()
        if w.rank == 0:
            Path(args.out).write_text(json.dumps(result))
    finally:
        w.dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# driver


class ProfileError(RuntimeError):
    pass


def run_workers(nproc: int, quick: bool, on_progress: Callable[[int, int, str], None] | None = None,
                timeout_s: float = 600.0) -> dict[str, Any]:
    """Launch the worker on ``nproc`` local ranks with torchrun; return rank 0's raw JSON."""
    with tempfile.TemporaryDirectory(prefix="autoplan-profile-") as tmp:
        raw = Path(tmp) / "raw.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "autoplan.profiler.measure", "--out", str(raw)] + (["--quick"] if quick else [])
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        env["PYTHONWARNINGS"] = "ignore"
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        tail: list[str] = []
        t0 = time.monotonic()
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS_TAG):
                _, i, total, label = line.rstrip("\n").split(" ", 3)
                if on_progress:
                    on_progress(int(i), int(total), label)
            else:
                tail = (tail + [line.rstrip("\n")])[-20:]
            if time.monotonic() - t0 > timeout_s:
                proc.kill()
                raise ProfileError(f"profiling took more than {timeout_s:.0f} s: killed (try --quick)")
        rc = proc.wait()
        if rc != 0 or not raw.is_file():
            msg = " | ".join(l for l in tail if l.strip())[-600:]
            raise ProfileError(f"profiling workers failed (exit {rc}): {msg}")
        return json.loads(raw.read_text())


def _r(x: float) -> float:
    """4 significant digits: measurements are not more precise than that."""
    return float(f"{x:.4g}")


def build_profile(raw: dict[str, Any], name: str, date: str | None = None) -> dict[str, Any]:
    """A profile tree (schema autoplan-profile/1) with a ``measured:`` section, from the workers' JSON."""
    from autoplan.hardware import SCHEMA
    from autoplan.cost.comm import latency_steps
    from autoplan.profiler.tables import Curve, bus_factor

    date = date or _dt.date.today().isoformat()
    meta = raw["meta"]
    n = int(meta["world"])
    threads = meta.get("threads_per_rank")
    cpu = meta["backend"] == "gloo"
    quick = meta.get("mode") == "quick"
    tag = f"({date}{', --quick' if quick else ''})"
    where = (f"{n} CPU ranks over gloo, {threads} thread(s) each, on {meta.get('cpu_count')} cores" if cpu
             else f"{n} GPUs ({meta['device']}) over NCCL")
    passes = int(meta.get("passes", 1))
    if passes > 1:
        where += f", median of {passes} passes"
    ms = f"measured here: {where}"

    matmul_tree, peaks = {}, {}
    for dname, rows in raw["matmul"].items():
        curve = Curve.from_points([r["flops"] for r in rows], [r["flops_per_s"] for r in rows])
        best = max(rows, key=lambda r: r["flops_per_s"])
        peaks[dname] = {"value": _r(curve.plateau), "source": (
            f"{ms}: matmul plateau (monotone-smoothed) over {len(rows)} shapes, best raw "
            f"{best['flops_per_s'] / 1e9:.3g} GFLOP/s at {'x'.join(map(str, best['shape']))}, per rank with all ranks running {tag}")}
        matmul_tree[dname] = {
            "shapes": [list(r["shape"]) for r in rows],
            "flops": [int(r["flops"]) for r in rows],
            "flops_per_s": [_r(r["flops_per_s"]) for r in rows],
        }
    attention_tree = {
        dname: {"shapes": [list(r["shape"]) for r in rows], "flops": [int(r["flops"]) for r in rows],
                "flops_per_s": [_r(r["flops_per_s"]) for r in rows]}
        for dname, rows in (raw.get("attention") or {}).items() if rows
    }
    mem_rows = raw["memory"]
    big = mem_rows[-1]
    mem_bw = {"value": _r(big["bytes_per_s"]), "source": (
        f"{ms}: tensor copy of {_fmt_bytes(big['bytes'] / 2)} (read + write), per rank with all ranks copying {tag}")}

    reshard = reshard_overheads(raw)
    colls = raw.get("collectives", {})
    link_tree: dict[str, Any] = {}
    for g, kinds in colls.items():
        for kind, rows in kinds.items():
            if isinstance(rows, dict):  # unsupported
                link_tree.setdefault(kind, {})[int(g)] = {"unsupported": rows.get("unsupported", "yes")}
                continue
            gi = int(g)
            link_tree.setdefault(kind, {})[gi] = {
                "bytes": [int(r["bytes"]) for r in rows],
                "seconds": [_r(r["seconds"]) for r in rows],
                "bus_bytes_per_s": [_r(r["bytes"] * bus_factor(kind, gi) / r["seconds"]) for r in rows],
            }
    ar = link_tree.get("all_reduce", {}).get(n) if n > 1 else None
    if ar and "bytes" in ar:
        ar_curve = Curve.from_points([b * bus_factor("all_reduce", n) for b in ar["bytes"]], ar["bus_bytes_per_s"])
        bw = {"value": _r(ar_curve.plateau), "source": (
            f"{ms}: all_reduce bus bandwidth plateau, {n} ranks, up to {_fmt_bytes(ar['bytes'][-1])} {tag}")}
        t_small = ar["seconds"][0]
        lat = {"value": _r(t_small / latency_steps("all_reduce", n)), "source": (
            f"{ms}: all_reduce of {_fmt_bytes(ar['bytes'][0])}, {n} ranks, {t_small * 1e3:.3g} ms over "
            f"{latency_steps('all_reduce', n)} steps {tag}")}
    else:
        bw = {"value": _r(mem_bw["value"] / 2), "source": "assumed: half the copy bandwidth (one rank: no collective measured)"}
        lat = {"value": 1e-5, "source": "assumed: one rank, no collective measured"}
    eff = {"value": 1.0, "source": "measured bandwidth is already the achieved bus bandwidth"}
    same = "assumed: same as intra-node (one node measured; inter-node links not measurable here)"
    tree: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "description": (f"Measured by `autoplan profile` on {meta.get('host')}: {where} (torch {meta.get('torch')}). "
                        "Wall-clock timings on a shared machine: noisy."),
        "devices_per_node": {"value": n, "source": f"measured here: {n} ranks launched on one node {tag}"},
        "device": {
            "name": "cpu-rank" if cpu else str(meta["device"]),
            "memory_bytes": {"value": _r(meta["memory_bytes"]), "source": (
                f"measured here: available memory / {n} ranks {tag}" if cpu else f"measured here: total device memory {tag}")},
            "usable_memory_fraction": {"value": 0.8 if cpu else 0.9, "source": (
                "assumed: torch, gloo and Python overhead per rank" if cpu else "assumed: CUDA context, NCCL buffers, fragmentation")},
            "peak_flops_per_s": peaks,
            "memory_bandwidth_bytes_per_s": mem_bw,
            "matmul_efficiency": {"value": 1.0, "source": "measured peak is already the achieved rate"},
            "memory_efficiency": {"value": 1.0, "source": "measured bandwidth is already the achieved rate"},
            **_dispatch_fields(raw, f"{ms} {tag}"),
        },
        "links": {
            "intra_node": {"bandwidth_bytes_per_s": bw, "latency_s": lat, "efficiency": eff},
            "inter_node": {
                "bandwidth_bytes_per_s": {"value": bw["value"], "source": same},
                "latency_s": {"value": lat["value"], "source": same},
                "efficiency": eff,
            },
        },
        "measured": {
            "date": date,
            "host": meta.get("host"),
            "torch": meta.get("torch"),
            "backend": meta["backend"],
            "ranks": {"value": n, "source": f"measured here: ranks launched by torchrun {tag}"},
            "threads_per_rank": {"value": threads, "source": f"measured here: torch.get_num_threads() in each rank {tag}"},
            "mode": "quick" if quick else "full",
            "passes": {"value": passes, "source": f"measured here: each number is the median over this many passes {tag}"},
            "note": ("Curves are raw measurements; the cost model smooths them (rates non-decreasing in size, "
                     "times non-decreasing) and interpolates in log-space. Noisy: shared machine, few repetitions."),
            "device": {
                "source": f"{ms} {tag}",
                "matmul": matmul_tree,
                **({"attention": attention_tree} if attention_tree else {}),
                **({"reshard": {"group_sizes": sorted(reshard), "seconds": [_r(reshard[g]) for g in sorted(reshard)]}}
                   if reshard else {}),
                "memory": {"bytes": [int(r["bytes"]) for r in mem_rows],
                           "bytes_per_s": [_r(r["bytes_per_s"]) for r in mem_rows]},
            },
            "links": {
                "intra_node": {"source": (f"{ms}: collectives on every group size of the meshes {n} ranks form"
                                          + (f", each between {CHUNK_MM}^3 matmuls on every rank as in a step "
                                             "(matmul alone subtracted)" if cpu else "") + f" {tag}"),
                               "collectives": link_tree},
                "inter_node": {"same_as": "intra_node", "source": same},
            },
        },
    }
    if not link_tree:
        del tree["measured"]["links"]
    return tree


RESHARD_KINDS = ("all_to_all", "all_gather", "all_reduce")


def reshard_overheads(raw: dict[str, Any]) -> dict[int, float] | None:
    """Group size -> what a planned move costs beyond its collective (median over kinds, >= 0)."""
    rs = raw.get("reshard")
    if not rs:
        return None
    return {int(g): statistics.median(max(0.0, r[f"{k}_move_s"] - r[f"{k}_bare_s"]) for k in RESHARD_KINDS)
            for g, r in rs.items()}


def _dispatch_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``dtensor_dispatch_s``: what one op costs the per-op runtime beyond the op itself (forward + backward);
    ``optimizer_tensor_s`` / ``optimizer_dtensor_s``: the optimizer's fixed cost per parameter tensor;
    ``reshard_overhead_s``: what a planned move of the per-op runtime costs beyond its collective."""
    out: dict[str, Any] = {}
    o = raw.get("optimizer") or {}
    opt_extra = 0.0
    for key, what in (("tensor_s", "plain tensors"), ("dtensor_s", "DTensors sharded over all ranks")):
        if key in o:
            out[f"optimizer_{key}"] = {"value": _r(o[key]), "source": (
                f"{where}: AdamW step over 32 small {what} minus over one of the same total size, per tensor")}
    if "tensor_s" in o and "dtensor_s" in o:
        opt_extra = max(0.0, o["dtensor_s"] - o["tensor_s"])
    rs = raw.get("reshard")
    per_group = reshard_overheads(raw)
    if rs and per_group:
        world = max(per_group)
        detail = ", ".join(f"{k} {rs[str(world)][f'{k}_move_s'] * 1e3:.2f} vs {rs[str(world)][f'{k}_bare_s'] * 1e3:.2f} ms"
                           for k in RESHARD_KINDS)
        out["reshard_overhead_s"] = {"value": _r(per_group[world]), "source": (
            f"{where}: the per-op runtime's planned move minus the bare collective on the same bytes, {world} ranks, "
            f"each timed between matmuls as in a step, median over kinds ({detail}); per group size in "
            "measured.device.reshard")}
    e = raw.get("engine")
    if e:
        # the per-op step also pays the optimizer's DTensor cost for every parameter: priced on its own
        extra = max(0.0, e["per_op_step_s"] - e["native_step_s"] - e.get("params", 0.0) * opt_extra) / e["ops"]
        out["dtensor_dispatch_s"] = {"value": _r(extra), "source": (
            f"{where}: a 2-layer GPT's DDP step run per-op minus run natively (same collectives), less the "
            f"optimizer's DTensor cost, per op ({e['per_op_step_s'] * 1e3:.1f} vs {e['native_step_s'] * 1e3:.1f} ms "
            f"over {e['ops']:.0f} ops)")}
        return out
    d = raw.get("dispatch")
    if not d:
        return out
    extra = max(0.0, d["dtensor_op_s"] - d["plain_op_s"])
    out["dtensor_dispatch_s"] = {"value": _r(extra), "source": (
        f"{where}: a chain of tiny elementwise ops, forward + backward, as DTensors minus as plain tensors "
        f"({d['dtensor_op_s'] * 1e6:.0f} vs {d['plain_op_s'] * 1e6:.0f} us per op)")}
    return out


class _FlowList(list):
    pass


def dump_profile(tree: dict[str, Any]) -> str:
    """YAML with the curve lists and {value, source} pairs on one line each."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def flow_list(d, data):
        return d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)

    def flow_map(d, data):
        return d.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)

    class _Pair(dict):
        pass

    Dumper.add_representer(_FlowList, flow_list)
    Dumper.add_representer(_Pair, flow_map)

    def mark(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {"value", "source"}:
                return _Pair(x)
            return {k: mark(v) for k, v in x.items()}
        if isinstance(x, list):
            if all(isinstance(v, (int, float)) for v in x) or all(isinstance(v, list) for v in x):
                return _FlowList([_FlowList(v) if isinstance(v, list) else v for v in x])
            return [mark(v) for v in x]
        return x

    return yaml.dump(mark(tree), Dumper=Dumper, sort_keys=False, width=200)


def median_of_passes(raws: list[Any]) -> Any:
    """Several measurement passes combined leaf by leaf: the median of each number (the lower
    median, so an even count still gives a measured value), the first pass's everything else."""
    first = raws[0]
    if len(raws) == 1:
        return first
    if isinstance(first, dict):
        same = [r for r in raws if isinstance(r, dict) and r.keys() == first.keys()]
        return {k: median_of_passes([r[k] for r in same]) for k in first}
    if isinstance(first, list):
        same = [r for r in raws if isinstance(r, list) and len(r) == len(first)]
        return [median_of_passes([r[i] for r in same]) for i in range(len(first))]
    if isinstance(first, float) and all(isinstance(r, (int, float)) for r in raws):
        return statistics.median_low(raws)
    return first


def run_profile(nproc: int, quick: bool, out: str | Path, name: str | None = None,
                on_progress: Callable[[int, int, str], None] | None = None,
                repeat: int = 1) -> tuple[dict[str, Any], float]:
    """Measure (``repeat`` passes, combined by ``median_of_passes``), write ``out``, check it loads;
    return (profile tree, wall seconds)."""
    from autoplan.hardware import load_cluster

    t0 = time.monotonic()
    repeat = max(1, repeat)

    def progress_of(k: int) -> Callable[[int, int, str], None] | None:
        if on_progress is None or repeat == 1:
            return on_progress
        return lambda i, total, label: on_progress(i + k * total, total * repeat, f"pass {k + 1}/{repeat}: {label}")

    raw = median_of_passes([run_workers(nproc, quick, progress_of(k)) for k in range(repeat)])
    raw["meta"]["passes"] = repeat
    out = Path(out)
    tree = build_profile(raw, name or out.stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_profile(tree))
    load_cluster(out)  # the written profile must load
    return tree, time.monotonic() - t0


if __name__ == "__main__":
    worker_main()
