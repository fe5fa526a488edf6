"""``autoplan profile``: measure this machine and write a profile YAML (issue #5).

Registered in ``autoplan/cli.py`` with ``main.add_command(profile_command)``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from autoplan.errors import AutoplanError

try:  # one-line errors, exit code 2, as every autoplan command
    from autoplan.clitools import fail_cleanly
except ImportError:  # pragma: no cover
    def fail_cleanly(fn):  # type: ignore[no-redef]
        return fn


class ProfileFailed(AutoplanError):
    pass


def _summary(tree: dict, seconds: float, out: Path) -> str:
    dev, link = tree["device"], tree["links"]["intra_node"]
    peaks = ", ".join(f"{k} {v['value'] / 1e9:.3g} GFLOP/s" for k, v in dev["peak_flops_per_s"].items())
    lines = [
        f"wrote {out} in {seconds:.0f} s ({tree['measured']['ranks']['value']} ranks, {tree['measured']['backend']}; "
        "numbers are noisy on a shared machine)",
        f"  matmul per rank: {peaks}",
        f"  memory copy per rank: {dev['memory_bandwidth_bytes_per_s']['value'] / 1e9:.3g} GB/s",
        f"  all_reduce bus bandwidth: {link['bandwidth_bytes_per_s']['value'] / 1e9:.3g} GB/s, "
        f"latency per step {link['latency_s']['value'] * 1e6:.0f} us",
        "  inter-node: assumed = intra-node (one node measured)",
    ]
    return "\n".join(lines)


@click.command("profile")
@click.option("--nproc", type=click.IntRange(1, 1024), default=None,
              help="Ranks to launch on this machine [default: GPUs if any, else 2].")
@click.option("--quick", is_flag=True, help="A few small sizes only (seconds, for tests and smoke checks).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), required=True,
              help="Profile to write, e.g. profiles/my-machine.yaml.")
@click.option("--name", default=None, help="Profile name [default: the output file's stem].")
@click.option("--repeat", type=click.IntRange(1, 9), default=1, show_default=True,
              help="Measure this many times and keep each number's median (a shared machine drifts).")
@fail_cleanly
def profile_command(nproc: int | None, quick: bool, output: str, name: str | None, repeat: int) -> None:
    """Measure this machine (matmul, memory bandwidth, collectives) and write a profile.

    Launches NPROC ranks with torchrun (CPU ranks over gloo, or one GPU per rank over NCCL)
    and writes a profile in the schema of profiles/*.yaml, every number with its source,
    plus a `measured:` section with the curves the cost model interpolates.
    """
    from autoplan.profiler.measure import ProfileError, run_profile

    if nproc is None:
        try:
            import torch

            nproc = torch.cuda.device_count() or 2
        except Exception:  # noqa: BLE001
            nproc = 2
    out = Path(output)
    state = {"bar": None, "last": 0}
    interactive = sys.stderr.isatty()

    def on_progress(i: int, total: int, label: str) -> None:
        if interactive:
            if state["bar"] is None:
                state["bar"] = click.progressbar(length=total, label="measuring", file=sys.stderr,
                                                 item_show_func=lambda x: x)
                state["bar"].__enter__()
            state["bar"].update(i - state["last"], label)
        else:
            click.echo(f"[{i}/{total}] {label}", err=True)
        state["last"] = i

    click.echo(f"profiling {nproc} rank(s){' (quick)' if quick else ''}: starting torchrun ...", err=True)
    try:
        tree, seconds = run_profile(nproc, quick, out, name, on_progress, repeat)
    except ProfileError as exc:
        raise ProfileFailed(str(exc)) from None
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
    click.echo(_summary(tree, seconds, out))
