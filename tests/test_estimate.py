"""What-if estimates: pipeline bubble, interleaving, recompute, ZeRO, and the CLI."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from autoplan.api import prepare_job
from autoplan.cli import main
from autoplan.errors import AutoplanError
from autoplan.estimate import EstimateConfig, estimate
from autoplan.pipeline_search import search_pipeline

SPEC = "gpt:layers=8,hidden=1024,heads=16,vocab=32000,seq=1024"


@pytest.fixture(scope="module")
def job():
    return prepare_job(SPEC, cluster="dgx-a100-80gb", devices=32, global_batch=64, seq_len=1024)


def test_pipeline_bubble_is_p_minus_1_stage_times_and_shrinks_with_interleaving(job):
    plain = estimate(job, EstimateConfig(tp=2, pp=4, dp=4, micro_batch=1))
    inter = estimate(job, EstimateConfig(tp=2, pp=4, dp=4, micro_batch=1, virtual_stages=2))
    m = plain.micro_batches
    assert m == 64 // 4
    stage = (plain.step_time_s - plain.bubble_s - plain.optimizer_s) / m  # upper bound incl. dp sync share
    assert plain.bubble_s == pytest.approx(3 * (plain.bubble_s / 3))
    assert plain.bubble_s <= 3 * stage
    assert inter.bubble_s < plain.bubble_s


def test_full_recompute_trades_compute_for_activation_memory(job):
    none = estimate(job, EstimateConfig(tp=2, pp=2, dp=8, micro_batch=2))
    full = estimate(job, EstimateConfig(tp=2, pp=2, dp=8, micro_batch=2, recompute="full"))
    assert full.peak_memory_bytes < none.peak_memory_bytes
    assert full.compute_s > none.compute_s
    assert full.hardware_tflops_per_device > full.model_tflops_per_device
    assert none.hardware_tflops_per_device == pytest.approx(none.model_tflops_per_device)


def test_zero_stages_shard_more_state_each(job):
    mems = [estimate(job, EstimateConfig(tp=1, pp=1, dp=32, micro_batch=2, zero=z)).peak_memory_bytes for z in (0, 1, 2, 3)]
    assert mems[0] > mems[1] > mems[2] > mems[3]


def test_configuration_arithmetic_errors_show_the_numbers(job):
    with pytest.raises(AutoplanError, match=r"tp\(2\) \* pp\(2\) \* dp\(2\) = 8 != devices\(32\)"):
        estimate(job, EstimateConfig(tp=2, pp=2, dp=2))
    with pytest.raises(AutoplanError, match="layers"):
        estimate(job, EstimateConfig(tp=1, pp=16, dp=2, virtual_stages=1))


def test_pipeline_search_finds_a_fitting_configuration_no_slower_than_a_fixed_one(job):
    cfg, best, n = search_pipeline(job, max_micro_batch=4, virtual=(1, 2))
    assert n > 4 and best.fits
    fixed = estimate(job, EstimateConfig(tp=2, pp=2, dp=8, micro_batch=1))
    assert best.step_time_s <= fixed.step_time_s


def test_estimate_cli_prints_json_with_throughput_fields():
    r = CliRunner().invoke(main, ["estimate", SPEC, "--cluster", "dgx-a100-80gb", "--tp", "2", "--pp", "2", "--dp", "2",
                                  "--micro-batch", "2", "--recompute", "full", "--global-batch", "16", "--seq-len", "1024", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for key in ("step_time_s", "mfu", "peak_memory_bytes", "fits", "tokens_per_s", "model_tflops_per_device",
                "hardware_tflops_per_device"):
        assert key in d
    bad = CliRunner().invoke(main, ["estimate", SPEC, "--cluster", "dgx-a100-80gb", "--tp", "3", "--global-batch", "16"])
    assert bad.exit_code == 2 and "error:" in bad.output
