"""Unmodified transformers models, one per family, planned for 4 CPU ranks and trained 3 SGD steps on
their own loss (labels in the inputs dict): losses and parameters equal one process. One torchrun launch.

Each case fixes a layout that really shards (Megatron tensor x data parallel, FSDP, DDP with a
synchronised batch norm), so the equality is not that of four replicas.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                 reason="transformers is not installed (pip install autoplan[hf])")]

HERE = Path(__file__).parent / "multirank"
CASES = {  # family -> catalogue model and the layout it is planned on
    "decoder": "llama:dp=2+tp=2:megatron",
    "moe decoder": "mixtral:dp=2+tp=2:megatron",
    "encoder": "bert:dp=2+tp=2:megatron",
    "encoder-decoder": "t5:dp=2+tp=2:megatron",
    "vit": "vit:dp=4:fsdp",
    "cnn with batch norm": "resnet:dp=4:ddp",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("hf") / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "hf_families_worker.py", str(out), ",".join(CASES.values())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stderr[-3000:]
    return {c["case"]: c for c in json.loads(out.read_text())}


@pytest.mark.parametrize("family", list(CASES))
def test_transformers_model_trains_on_4_ranks_as_one_process(report, family):
    r = report[CASES[family]]
    assert "error" not in r, r.get("traceback")
    assert r["loss_rel"] < 1e-5, r  # the model's own loss, 3 SGD steps
    assert r["param_abs"] < 1e-4, r  # every parameter after them
    assert r["state_keys_equal"], r  # full_state_dict() keys are model.state_dict() keys
    assert not r["unplanned"], r["unplanned"]  # every op produced its planned placement
    sharded = [p for p in r["params_sharded"] if "S(" in p] or [i for i in r["inputs"].values() if "S(" in i]
    assert sharded, r  # the plan splits something: not four replicas


FACTORY = '''
import torch, transformers as tf

def factory():
    cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    return tf.BertForSequenceClassification(cfg), {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])}
'''


def test_cli_plans_and_trains_a_factory_that_returns_keyword_inputs(tmp_path):
    """`autoplan plan file.py:factory` then `autoplan train` on 2 ranks: the factory's own batch, repeated."""
    (tmp_path / "tinybert.py").write_text(FACTORY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model = f"{tmp_path / 'tinybert.py'}:factory"
    plan = subprocess.run([sys.executable, "-m", "autoplan.cli", "plan", model, "--cluster", "cpu", "--devices", "2",
                           "--global-batch", "8", "-o", str(tmp_path / "plan.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-2000:]
    train = subprocess.run([sys.executable, "-c", "from autoplan.runtime.launch import train_command; train_command()",
                            str(tmp_path / "plan.json"), "--model", model, "--steps", "6"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in train.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 6 and losses[-1] < losses[0], train.stdout
