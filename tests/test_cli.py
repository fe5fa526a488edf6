"""The command line, through click's runner: output, JSON fields, and one-line errors with exit code 2."""
from __future__ import annotations

import json

from click.testing import CliRunner

from autoplan.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_plan_json_has_the_promised_fields_and_writes_the_plan_file(tmp_path):
    out = tmp_path / "p.json"
    r = run("plan", "gpt-tiny", "--cluster", "cpu", "--devices", "4", "--global-batch", "8", "--seq-len", "32",
            "--json", "-o", str(out))
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for key in ("step_time_s", "mfu", "peak_memory_bytes", "fits", "mesh", "baselines"):
        assert key in d
    for name, b in d["baselines"].items():
        assert {"step_time_s", "mfu", "peak_memory_bytes", "fits"} <= set(b), name
    assert json.loads(out.read_text())["schema"] == "autoplan-plan/1"


def test_plan_prints_a_table_beside_the_baselines():
    r = run("plan", "mlp", "--cluster", "dgx-h100", "--nodes", "1", "--global-batch", "256")
    assert r.exit_code == 0, r.output
    assert "autoplan" in r.output and "ddp" in r.output and "fsdp" in r.output and "step time" in r.output


def test_mesh_option_fixes_the_mesh_axes():
    r = run("plan", "gpt-tiny", "--cluster", "cpu", "--devices", "4", "--global-batch", "8", "--seq-len", "32",
            "--mesh", "dp=2,tp=2", "--no-baselines", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["mesh"] == {"dp": 2, "tp": 2}


def _one_line_error(r, *words: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_unknown_model_is_a_one_line_error_with_the_choices():
    _one_line_error(run("plan", "gtp2", "--cluster", "cpu", "--devices", "4", "--global-batch", "8"), "gtp2", "gpt2")


def test_unknown_cluster_is_a_one_line_error_with_the_profiles():
    _one_line_error(run("plan", "gpt2", "--cluster", "dgx-h101", "--devices", "4", "--global-batch", "8"), "dgx-h101", "dgx-h100")


def test_model_that_fits_no_plan_names_the_smallest_memory_needed():
    r = run("plan", "gpt2", "--cluster", "dgx-h100", "--devices", "2", "--global-batch", "8", "--seq-len", "1024",
            "--memory-gib", "0.001")
    _one_line_error(r, "smallest plan needs", "iB; add devices")  # in MiB or GiB


def test_capture_failure_is_a_one_line_error(tmp_path):
    f = tmp_path / "branchy.py"
    f.write_text(
        "import torch, torch.nn as nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.l = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n        return self.l(x) if x.sum() > 0 else -self.l(x)\n"
        "    def example_inputs(self, batch, seq):\n        return (torch.randn(batch, 4),)\n"
        "    def example_targets(self, batch, seq):\n        return torch.zeros(batch, dtype=torch.long)\n"
        "def make():\n    return M()\n"
    )
    _one_line_error(run("plan", f"{f}:make", "--cluster", "cpu", "--devices", "2", "--global-batch", "4"), "could not capture")


def test_bad_mesh_and_missing_device_count_are_one_line_errors():
    _one_line_error(run("plan", "gpt-tiny", "--cluster", "cpu", "--devices", "4", "--global-batch", "8", "--mesh", "dp=3"), "dp(3)")
    _one_line_error(run("plan", "gpt-tiny", "--cluster", "cpu", "--global-batch", "8"), "nodes", "devices")


def test_models_and_clusters_list_the_zoo_and_the_profiles():
    r = run("models")
    assert r.exit_code == 0 and "gpt3-175b" in r.output and "llama3-405b" in r.output
    r = run("clusters")
    assert r.exit_code == 0 and "dgx-a100-80gb" in r.output and "cpu" in r.output
