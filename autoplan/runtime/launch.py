"""``autoplan train``: launch torchrun on this machine to train a zoo model with a plan.

The command checks the plan, model and data before launching, then runs
``python -m torch.distributed.run --standalone --nproc-per-node <plan world size>
-m autoplan.runtime.launch ...`` (this module's ``worker_main``) and relays its log.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import click

from autoplan.errors import AutoplanError
from autoplan.plan import Plan


def torchrun_command(nproc: int, worker_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "autoplan.runtime.launch", *worker_args]


def _check_inputs(plan_path: str, model: str, data: str | None, steps: int, every: int | None) -> Plan:
    from autoplan.models import resolve_model

    plan = Plan.load(plan_path)
    spec = resolve_model(model)  # UnknownModelError (one line) before any process starts
    if steps < 1:
        raise AutoplanError(f"--steps must be at least 1, got {steps}")
    if every is not None and every < 1:
        raise AutoplanError(f"--checkpoint-every must be at least 1, got {every}")
    if data is not None and not Path(data).is_file():
        raise AutoplanError(f"no token file at {data}: pass a flat file of uint16 tokens to --data")
    if not plan.data["training"].get("seq_len") and spec.build_with_inputs is None:
        raise AutoplanError("`autoplan train` trains language models, and factories that return their keyword inputs: "
                            "this plan has no sequence length and the model gives no inputs")
    return plan


def launch(plan_path: str, model: str, *, steps: int, data: str | None, checkpoint_dir: str | None,
           checkpoint_every: int | None, lr: float, seed: int) -> int:
    plan = _check_inputs(plan_path, model, data, steps, checkpoint_every)
    args = ["--plan", str(plan_path), "--model", model, "--steps", str(steps), "--lr", str(lr), "--seed", str(seed)]
    if data:
        args += ["--data", data]
    if checkpoint_dir:
        args += ["--checkpoint-dir", checkpoint_dir]
    if checkpoint_every:
        args += ["--checkpoint-every", str(checkpoint_every)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.call(torchrun_command(plan.world_size, args), env=env)


@click.command("train")
@click.argument("plan_path", metavar="PLAN.json")
@click.option("--model", required=True, help="zoo model the plan was made for, e.g. gpt-tiny")
@click.option("--steps", default=20, show_default=True, type=int, help="optimizer steps")
@click.option("--data", default=None, help="flat file of uint16 tokens (default: a synthetic learnable stream)")
@click.option("--checkpoint-dir", default=None, help="save here; resume from the newest complete checkpoint")
@click.option("--checkpoint-every", default=None, type=int, help="save every K steps (and at the end)")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="AdamW learning rate")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the model's initial weights")
def train_command(plan_path: str, model: str, steps: int, data: str | None, checkpoint_dir: str | None,
                  checkpoint_every: int | None, lr: float, seed: int) -> None:
    """Train MODEL with the plan PLAN.json on this machine (torchrun, gloo on CPU)."""
    try:
        code = launch(plan_path, model, steps=steps, data=data, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, lr=lr, seed=seed)
    except AutoplanError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if code != 0:
        click.echo(f"error: training failed (torchrun exit code {code}): see the log above", err=True)
        sys.exit(2)


# ------------------------------------------------------------------------------ the worker (one per rank)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="autoplan.runtime.launch")
    p.add_argument("--plan", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--data")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def worker_main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    from autoplan.models import resolve_model
    from autoplan.runtime.train import (RepeatedBatch, TokenStream, check_vocab, file_tokens, plan_and_train,
                                        synthetic_tokens)

    args = _parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank0 = dist.get_rank() == 0
    try:
        plan = Plan.load(args.plan)
        spec = resolve_model(args.model)
        torch.manual_seed(args.seed)
        t = plan.data["training"]
        if spec.build_with_inputs is not None:  # a factory with its own inputs: that batch, repeated
            model, example = spec.build_with_inputs()
            data = RepeatedBatch(example, int(t["global_batch"]))
        else:
            model = spec.build()
            vocab = int(getattr(spec.config, "vocab", 256))
            tokens = file_tokens(args.data) if args.data else synthetic_tokens(vocab)
            check_vocab(tokens, vocab)
            data = TokenStream(tokens, int(t["global_batch"]), int(t["seq_len"]))
        if rank0:
            print(f"training {args.model} on {dist.get_world_size()} ranks, mesh {plan.mesh}, "
                  f"{t['micro_batches']} micro-batch(es); predicted step {plan.predicted.step_time_s * 1e3:.2f} ms "
                  f"on {plan.data['cluster']['name']}", flush=True)
        lr = args.lr
        losses = plan_and_train(model, data, steps=args.steps, plan=plan,
                                optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr),
                                checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every)
        if rank0 and losses:
            print(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps", flush=True)
        return 0
    except AutoplanError as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(worker_main())
