"""The ``autoplan`` command line. Every error is one line on stderr and exit code 2."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from autoplan.clitools import fail_cleanly
from autoplan.errors import AutoplanError


_fail_cleanly = fail_cleanly


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f} GiB"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def solver_line(summary: dict[str, Any]) -> str:
    s = summary["solver"]
    lines = [f"solver {s['name']} ({fmt_seconds(s['seconds'])}, gap {s['gap']:.2g}); search {fmt_seconds(s['search_seconds'])} over {s['configurations']} configurations"]
    pipe = summary.get("pipeline_alternative")
    if pipe and pipe.get("found"):
        c, e = pipe["config"], pipe["predicted"]
        chosen = (summary.get("execution") or {}).get("from") == "pipeline search"
        lines.append(f"pipeline {'(chosen)' if chosen else 'alternative'}: tp={c['tp']} pp={c['pp']} dp={c['dp']} "
                     f"micro-batch {c['micro_batch']} v={c['virtual_stages']} recompute {c['recompute']}: "
                     f"{fmt_seconds(e['step_time_s'])}, MFU {100 * e['mfu']:.1f}%"
                     + (f" (not run: {pipe['why_not']})" if pipe.get("executable") is False else ""))
    elif pipe and pipe.get("why_not"):
        lines.append(f"pipeline: not searched ({pipe['why_not']})")
    if summary.get("unsupported_ops"):
        lines.append("replicated (no sharding rule): " + ", ".join(summary["unsupported_ops"]))
    return "\n".join(lines)


class _SearchProgress:
    """A progress bar on stderr while the search runs (only on a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None
        self.label = ""

    def __enter__(self):
        return self if self.enabled else None

    def __call__(self, label: str, done: int, total: int) -> None:
        if label != self.label:
            if self.bar is not None:
                self.bar.render_finish()
            self.label = label
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self.bar.render_progress()
        self.bar.update(done - self.bar.pos)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.render_finish()


@click.group()
@click.version_option(package_name="autoplan")
def main() -> None:
    """autoplan: choose how to parallelize PyTorch training, prove it, run it."""


@main.command("plan")
@click.argument("model")
@click.option("--cluster", required=True, help="Hardware profile name (see `autoplan clusters`) or path to a profile .yaml.")
@click.option("--nodes", type=int, help="Number of nodes (devices = nodes x devices per node).")
@click.option("--devices", type=int, help="Number of devices (instead of --nodes).")
@click.option("--global-batch", type=int, required=True, help="Samples per optimizer step.")
@click.option("--seq-len", type=int, help="Tokens per sample (language models).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True, help="Compute dtype.")
@click.option("--mesh", help="Fix the mesh axes, e.g. dp=2,tp=4 (the last axis is innermost); the solver still picks every op's sharding.")
@click.option("--micro-batches", help="Comma-separated gradient-accumulation counts to consider (default: every divisor of the global batch up to 64).")
@click.option("--memory-gib", type=float, help="Override usable memory per device, GiB (what-if).")
@click.option("--solver", type=click.Choice(["auto", "dp", "ilp"]), default="auto", show_default=True, help="Solver for memory-constrained problems.")
@click.option("--no-baselines", is_flag=True, help="Skip pricing the DDP / FSDP / Megatron baselines.")
@click.option("--pipeline/--no-pipeline", default=None,
              help="Also search pipeline configurations (TP x PP x DP, interleaving, recompute, ZeRO); the plan takes the "
                   "best when it is faster. Default: on unless --mesh, --micro-batches or --memory-gib fixes the layout.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the plan JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@_fail_cleanly
def plan_cmd(model: str, cluster: str, nodes: int | None, devices: int | None, global_batch: int, seq_len: int | None,
             dtype: str, mesh: str | None, micro_batches: str | None, memory_gib: float | None, solver: str,
             no_baselines: bool, pipeline: bool | None, output: str | None, as_json: bool) -> None:
    """Plan MODEL (a zoo name, family:key=value,..., path/file.py:factory or package.module:factory)."""
    from autoplan.api import plan

    counts = None
    if micro_batches:
        try:
            counts = [int(x) for x in micro_batches.split(",")]
        except ValueError:
            raise AutoplanError(f"--micro-batches {micro_batches!r}: give whole numbers separated by commas, e.g. 1,2,4") from None
    with _SearchProgress(enabled=not as_json) as progress:
        result = plan(model, cluster=cluster, nodes=nodes, devices=devices, global_batch=global_batch, seq_len=seq_len,
                      dtype=dtype, mesh=mesh, micro_batches=counts,
                      memory_bytes=memory_gib * 2**30 if memory_gib else None, solver=solver, baselines=not no_baselines,
                      pipeline=pipeline, progress=progress)
    if output:
        result.save(output)
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        from autoplan.report.text import summary as rich_summary

        click.echo(rich_summary(result.data, color=sys.stdout.isatty()))
        extra = [line for line in solver_line(summary).splitlines()[1:]  # the summary has the solver line and the pipeline
                 if not line.startswith("pipeline ")]
        if extra:
            click.echo("\n".join(extra))
        if output:
            click.echo(f"plan written to {output}")


@main.command("estimate")
@click.argument("model")
@click.option("--cluster", required=True, help="Hardware profile name or path.")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel size (inside a node).")
@click.option("--pp", type=int, default=1, show_default=True, help="Pipeline stages.")
@click.option("--dp", type=int, default=1, show_default=True, help="Data-parallel size.")
@click.option("--virtual-stages", type=int, default=1, show_default=True, help="Interleaved 1F1B chunks per device.")
@click.option("--micro-batch", type=int, default=1, show_default=True, help="Samples per micro-batch per data-parallel rank.")
@click.option("--recompute", type=click.Choice(["none", "selective", "full"]), default="none", show_default=True)
@click.option("--sequence-parallel", is_flag=True, help="Split norms and dropouts along the sequence over tp.")
@click.option("--zero", type=click.IntRange(0, 3), default=0, show_default=True, help="ZeRO stage (3 = FSDP).")
@click.option("--global-batch", type=int, required=True)
@click.option("--seq-len", type=int)
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--attention", type=click.Choice(["flash", "unfused"]), default="flash", show_default=True,
              help="Attention kernel: fused (FlashAttention) or scores materialised.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Also write this configuration as a plan that `autoplan train` runs.")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def estimate_cmd(model: str, cluster: str, tp: int, pp: int, dp: int, virtual_stages: int, micro_batch: int,
                 recompute: str, sequence_parallel: bool, zero: int, global_batch: int, seq_len: int | None,
                 dtype: str, attention: str, output: str | None, as_json: bool) -> None:
    """Price one fixed configuration of MODEL (what-if) with the planner's cost model."""
    from autoplan.api import prepare_job
    from autoplan.estimate import EstimateConfig, estimate
    from autoplan.planner import config_plan

    job = prepare_job(model, cluster=cluster, devices=tp * pp * dp, global_batch=global_batch, seq_len=seq_len)
    cfg = EstimateConfig(tp=tp, pp=pp, dp=dp, virtual_stages=virtual_stages, micro_batch=micro_batch,
                         recompute=recompute, sequence_parallel=sequence_parallel, zero=zero, dtype=dtype, attention=attention)
    est = estimate(job, cfg)
    if output:
        config_plan(job, cfg).save(output)
    d = est.to_json()
    if as_json:
        click.echo(json.dumps(d))
        return
    click.echo(f"{model} on {tp * pp * dp} x {job.cluster.name}: tp={tp} pp={pp} dp={dp}, micro-batch {micro_batch} "
               f"x {est.micro_batches}, recompute {recompute}")
    click.echo(f"step time {fmt_seconds(est.step_time_s)} (compute {fmt_seconds(est.compute_s)}, comm {fmt_seconds(est.comm_s)}, "
               f"bubble {fmt_seconds(est.bubble_s)}, optimizer {fmt_seconds(est.optimizer_s)})")
    click.echo(f"MFU {100 * est.mfu:.1f}%  model {est.model_tflops_per_device:.1f} TFLOP/s/device  hardware "
               f"{est.hardware_tflops_per_device:.1f} TFLOP/s/device  memory {fmt_bytes(est.peak_memory_bytes)} "
               f"({'fits' if est.fits else 'DOES NOT FIT'})")
    if output:
        click.echo(f"plan written to {output}")


@main.command("models")
@_fail_cleanly
def models_cmd() -> None:
    """List the model zoo."""
    from autoplan.models import list_models

    for spec in list_models():
        click.echo(f"{spec.name:<14} {spec.num_params / 1e9:>9.3f}B  {spec.description}")
    click.echo("families: gpt:layers=..,hidden=..,heads=..,vocab=..  llama:...,kv_heads=..  or path/to/file.py:factory")


@main.command("clusters")
@_fail_cleanly
def clusters_cmd() -> None:
    """List the shipped hardware profiles."""
    from autoplan.hardware import list_clusters, load_cluster

    for name in list_clusters():
        c = load_cluster(name)
        click.echo(f"{name:<16} {c.devices_per_node} x {c.device.name}  {c.description}")


from autoplan.report.commands import diff as diff_cmd, explain as explain_cmd, show as show_cmd  # noqa: E402

main.add_command(show_cmd)
main.add_command(diff_cmd)
main.add_command(explain_cmd)

from autoplan.profiler.command import profile_command  # noqa: E402

main.add_command(profile_command)

from autoplan.runtime.launch import train_command  # noqa: E402

main.add_command(train_command)

if __name__ == "__main__":
    main()
