"""Profiler (issue #5): smoothing/interpolation of measured curves, `autoplan profile --quick`,
measured tables in the cost model (and exactly the old numbers without them), op-level cache."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from autoplan.cost.comm import collective_seconds, latency_steps
from autoplan.cost.model import _compute_seconds, price_mesh
from autoplan.hardware import PROFILES_DIR, cluster_from_dict, load_cluster
from autoplan.graph import forward_flops
from autoplan.mesh import Mesh
from autoplan.profiler.tables import Curve, isotonic_increasing, smooth, source_of, describe_sources


# ---------------------------------------------------------------------------------- tables


def test_isotonic_regression_pools_violators():
    assert isotonic_increasing([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert isotonic_increasing([5, 4, 3]) == [4, 4, 4]
    assert isotonic_increasing([1, 2, 3]) == [1, 2, 3]


def test_smoothing_makes_rates_and_times_non_decreasing_on_a_noisy_curve():
    rng = np.random.default_rng(0)
    sizes = [4096 * 4**i for i in range(9)]
    true_bw = [1e9 * s / (s + 1e6) for s in sizes]  # alpha-beta: rises to a plateau
    noisy = [b * float(rng.uniform(0.6, 1.4)) for b in true_bw]
    noisy[-2] *= 0.5  # a dip at a large size
    xs, rs = smooth(sizes, noisy)
    assert all(b >= a for a, b in zip(rs, rs[1:]))
    times = [x / r for x, r in zip(xs, rs)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    # unsorted input with duplicates gives the same curve as sorted
    xs2, rs2 = smooth(list(reversed(sizes)) + [sizes[0]], list(reversed(noisy)) + [noisy[0]])
    assert xs2 == xs


def test_interpolation_is_log_linear_exact_at_points_and_affine_beyond():
    c = Curve.from_points([1e3, 1e6], [1e6, 1e9])  # time 1 ms at both ends: a latency floor
    assert c.seconds(1e3) == pytest.approx(1e-3)
    assert c.seconds(1e4) == pytest.approx(1e-3)
    c = Curve.from_points([1e3, 1e5], [1e6, 1e7])  # times 1 ms, 10 ms: log-log midpoint at 1e4 -> sqrt
    assert c.seconds(1e4) == pytest.approx(math.sqrt(1e-3 * 1e-2))
    assert c.seconds(10.0) == pytest.approx(10.0 / 1e6)  # compute below the smallest: the smallest's rate
    # beyond the largest: the plateau rate, no fixed cost for a compute curve ...
    assert c.seconds(1e7) == pytest.approx(1e7 / 1e7)
    # ... plus the latency floor (the smallest measured time) for a collective, blended in up to 2x the largest size
    lat = Curve.from_points([1e3, 1e5], [1e6, 1e7], latency_floor=True)
    assert lat.floor_s == pytest.approx(1e-3)
    assert lat.seconds(10.0) == pytest.approx(1e-3)  # a collective below the smallest: its latency
    assert lat.seconds(1e5) == pytest.approx(1e-2)  # continuous at the largest size
    assert lat.seconds(1.5e5) == pytest.approx(1.5e-2 + 0.5e-3)
    big = [lat.seconds(x) for x in (1e8, 2e8, 3e8)]
    assert big[2] - big[1] == pytest.approx(big[1] - big[0])  # affine: the cost model's fit in the batch works
    assert big[0] - (big[1] - big[0]) == pytest.approx(1e-3)  # with the latency as intercept
    for a, b in zip([1e4, 1e5, 1.2e5, 2e5], [1e5, 1.2e5, 2e5, 1e6]):
        assert lat.seconds(b) >= lat.seconds(a)
    for a, b in zip([10, 1e3, 3e3, 1e4, 5e4, 1e5, 1e6], [1e3, 3e3, 1e4, 5e4, 1e5, 1e6, 1e7]):
        assert c.seconds(b) >= c.seconds(a)


def test_matmul_rate_is_monotone_in_flops_after_smoothing():
    c = Curve.from_points([1e6, 1e7, 1e8, 1e9], [5e9, 20e9, 15e9, 18e9])
    assert list(c.rates) == sorted(c.rates)
    assert c.plateau == pytest.approx(c.rates[-1])


# ------------------------------------------------------------------------ quick profile


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    from autoplan.profiler.command import profile_command

    out = tmp_path_factory.mktemp("prof") / "quick.yaml"
    res = CliRunner().invoke(profile_command, ["--quick", "--nproc", "2", "--repeat", "2", "-o", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, res.output


def _walk_numbers(node, path=""):
    if isinstance(node, dict):
        if set(node) == {"value", "source"}:
            yield path, node
            return
        for k, v in node.items():
            if k != "measured":
                yield from _walk_numbers(v, f"{path}.{k}" if path else str(k))


def test_quick_profile_writes_a_loadable_profile_with_sources(quick_profile):
    out, output = quick_profile
    assert "noisy" in output
    tree = yaml.safe_load(out.read_text())
    numbers = list(_walk_numbers(tree))
    assert len(numbers) >= 12
    for path, node in numbers:
        assert isinstance(node["value"], (int, float)), path
        assert node["source"].startswith(("measured here:", "measured", "assumed")), (path, node["source"])
    assert tree["device"]["peak_flops_per_s"]["fp32"]["source"].startswith("measured here:")
    assert "median of 2 passes" in tree["device"]["peak_flops_per_s"]["fp32"]["source"]
    assert "between 256^3 matmuls" in tree["measured"]["links"]["intra_node"]["source"]  # collectives as in a step
    assert tree["links"]["inter_node"]["bandwidth_bytes_per_s"]["source"].startswith("assumed")
    colls = tree["measured"]["links"]["intra_node"]["collectives"]
    assert set(colls) >= {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"}

    def no_bare_numbers(node, path="measured"):  # the rule of test_cost's shipped-profile check, inside measured:
        if isinstance(node, dict) and "value" in node:
            assert node.get("source"), path
        elif isinstance(node, dict):
            for k, v in node.items():
                no_bare_numbers(v, f"{path}.{k}")
        else:
            assert not isinstance(node, (int, float)), f"{path} is a bare number"

    no_bare_numbers(tree["measured"])
    cl = load_cluster(out)
    assert source_of(cl) == "measured"
    assert cl.intra_node.measured is not None and cl.inter_node.measured is cl.intra_node.measured
    assert describe_sources(cl)["matmul"] == "measured"
    assert cl.device.measured.matmul_seconds("fp32", 1e9) > 0
    assert cl.device.measured.attention_seconds("fp32", 1e9) > 0  # fused attention, forward + backward


def test_passes_combine_to_the_median_of_each_number_and_keep_everything_else():
    from autoplan.profiler.measure import median_of_passes

    passes = [
        {"meta": {"host": "a", "world": 4}, "matmul": {"fp32": [{"shape": [64, 64, 64], "seconds": s}]},
         "collectives": {"2": {"all_to_all": rows}}}
        for s, rows in ((3.0, [{"bytes": 4096.0, "seconds": 0.5}]), (1.0, {"unsupported": "no"}),
                        (2.0, [{"bytes": 4096.0, "seconds": 0.1}]))
    ]
    got = median_of_passes(passes)
    assert got["meta"] == {"host": "a", "world": 4}
    assert got["matmul"]["fp32"] == [{"shape": [64, 64, 64], "seconds": 2.0}]
    # a pass where a collective failed does not join the others' medians: the two that ran
    assert got["collectives"]["2"]["all_to_all"] == [{"bytes": 4096.0, "seconds": 0.1}]  # lower median of 2
    assert median_of_passes(passes[:1]) is passes[0]


# ------------------------------------------------------------- measured tables in the cost model


def _analytic_collective(kind, nbytes, n, link):
    factor = 2.0 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    return factor * nbytes / (link.bandwidth_bytes_per_s * link.efficiency) + latency_steps(kind, n) * link.latency_s


def test_profiles_without_tables_give_the_analytic_numbers_exactly(gpt_tiny_graph):
    for name in ("cpu", "dgx-h100"):
        cl = load_cluster(name)
        assert source_of(cl) == "analytic" and cl.device.measured is None
        for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
            for nb in (4096.0, 3.3e6, 1e9):
                assert collective_seconds(kind, nb, 4, cl.intra_node) == _analytic_collective(kind, nb, 4, cl.intra_node)
        dev = cl.device
        g = gpt_tiny_graph
        for node in g.nodes.values():
            if node.kind in ("linear", "layer_norm"):
                t = _compute_seconds(g, node, 8, cl, "fp32")
                from autoplan.cost.model import elem_bytes
                from autoplan.graph import forward_flops
                nbytes = sum(g.nodes[i].out.numel(8) * elem_bytes(g.nodes[i], "fp32") for i in node.inputs)
                nbytes += node.out.numel(8) * elem_bytes(node, "fp32")
                want = max(forward_flops(g, node, 8) / (dev.flops_per_s("fp32") * dev.matmul_efficiency),
                           nbytes / (dev.memory_bandwidth_bytes_per_s * dev.memory_efficiency))
                assert t == want


def _with_tables(base: dict, link_bw: float, mm_rate: float) -> dict:
    tree = copy.deepcopy(base)
    sizes = [4096 * 4**i for i in range(6)]
    tree["measured"] = {
        "device": {"source": "synthetic", "matmul": {"fp32": {"flops": [1e6, 1e8, 1e10], "flops_per_s": [mm_rate / 10, mm_rate, mm_rate]}},
                   "memory": {"bytes": [1e6, 1e8], "bytes_per_s": [5e9, 5e9]}},
        "links": {"intra_node": {"source": "synthetic", "collectives": {
            k: {4: {"bytes": sizes, "bus_bytes_per_s": [link_bw * s / (s + 1e5) for s in sizes]}}
            for k in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")}},
            "inter_node": {"same_as": "intra_node"}},
    }
    return tree


def test_measured_tables_change_collective_and_matmul_times(gpt_tiny_graph):
    base = yaml.safe_load((PROFILES_DIR / "cpu.yaml").read_text())
    plain = cluster_from_dict(base, "cpu")
    meas = cluster_from_dict(_with_tables(base, 0.1e9, 5e9), "synthetic")
    assert source_of(meas) == "measured"
    nb = 8 * 2**20
    t_plain = collective_seconds("all_reduce", nb, 4, plain.intra_node)
    t_meas = collective_seconds("all_reduce", nb, 4, meas.intra_node)
    assert t_meas > 2 * t_plain  # 0.1 GB/s measured vs 0.47 GB/s datasheet
    # a small message pays the measured curve's latency floor, a 2-rank axis reuses the 4-rank curve by bus bytes
    assert collective_seconds("all_reduce", 100, 4, meas.intra_node) == pytest.approx(
        collective_seconds("all_reduce", 4096, 4, meas.intra_node))
    assert collective_seconds("all_reduce", nb, 2, meas.intra_node) < t_meas
    g = gpt_tiny_graph
    lin = next(n for n in g.nodes.values() if n.kind == "linear")
    assert _compute_seconds(g, lin, 1024, meas, "fp32") != _compute_seconds(g, lin, 1024, plain, "fp32")
    # the whole price of a mesh moves, and the cached prices of the two clusters do not mix
    from autoplan.repeats import find_repeats as _fr
    tying = _fr(g)
    mesh = Mesh((4,), ("dp",))
    mp_plain = price_mesh(g, tying, mesh, plain, "fp32")
    mp_meas = price_mesh(g, tying, mesh, meas, "fp32")
    mp_plain2 = price_mesh(g, tying, mesh, cluster_from_dict(base, "cpu"), "fp32")
    for b in (8, 64):
        assert any(not np.allclose(x.at(b), y.at(b)) for x, y in zip(mp_plain.fwd_compute, mp_meas.fwd_compute))
        assert any(not np.allclose(x.bwd.at(b), y.bwd.at(b)) for x, y in zip(mp_plain.edges, mp_meas.edges))
        assert any(not np.allclose(x.fwd.at(b), y.fwd.at(b)) for x, y in zip(mp_plain.edges, mp_meas.edges))
        for x, y in zip(mp_plain.edges, mp_plain2.edges):
            assert np.array_equal(x.fwd.at(b), y.fwd.at(b)) and np.array_equal(x.bwd.at(b), y.bwd.at(b))
        for x, y in zip(mp_plain.fwd_compute, mp_plain2.fwd_compute):
            assert np.array_equal(x.at(b), y.at(b))


def test_a_measured_attention_curve_prices_fused_attention_and_nothing_else(gpt_tiny_graph):
    base = yaml.safe_load((PROFILES_DIR / "cpu.yaml").read_text())
    tree = _with_tables(base, 0.1e9, 5e9)
    without = cluster_from_dict(tree, "synthetic")
    tree["measured"]["device"]["attention"] = {"fp32": {"flops": [1e6, 1e10], "flops_per_s": [1e9, 1e9]}}
    with_att = cluster_from_dict(tree, "synthetic+attention")
    g = gpt_tiny_graph
    sdpa = next(n for n in g.nodes.values() if n.kind == "sdpa")
    lin = next(n for n in g.nodes.values() if n.kind == "linear")
    flops = forward_flops(g, sdpa, 64)
    assert _compute_seconds(g, sdpa, 64, with_att, "fp32") == pytest.approx(flops / 1e9)  # the attention curve's rate
    assert _compute_seconds(g, sdpa, 64, without, "fp32") < flops / 1e9  # the matmul curve's 5 GFLOP/s
    assert _compute_seconds(g, lin, 64, with_att, "fp32") == _compute_seconds(g, lin, 64, without, "fp32")
    # unfused attention is matmuls plus passes over the scores: not the fused kernel's curve
    assert _compute_seconds(g, sdpa, 64, with_att, "fp32", "unfused") == _compute_seconds(g, sdpa, 64, without, "fp32", "unfused")


def test_shipped_gpu_profiles_stay_analytic():
    for name in ("dgx-a100-80gb", "dgx-h100", "dgx-h200"):
        assert source_of(load_cluster(name)) == "analytic"


def test_bad_measured_section_is_a_one_line_error():
    from autoplan.errors import UnknownClusterError

    base = yaml.safe_load((PROFILES_DIR / "cpu.yaml").read_text())
    base["measured"] = {"device": {"matmul": {"fp32": {"flops": [1, 2], "flops_per_s": [1]}}}}
    with pytest.raises(UnknownClusterError, match="measured"):
        cluster_from_dict(base, "bad")
    base["measured"] = {"device": {"memory": {"bytes": [1e6], "bytes_per_s": [1e9]},
                                   "reshard": {"group_sizes": [2, 4], "seconds": [1e-3]}}}
    with pytest.raises(UnknownClusterError, match="reshard"):
        cluster_from_dict(base, "bad")


def test_move_overhead_is_looked_up_at_the_nearest_measured_group_size():
    cl = load_cluster(PROFILES_DIR / "cpu-measured.yaml")
    table = dict(cl.device.measured.reshard)
    assert set(table) == {2, 4} and cl.device.reshard_overhead_s == table[4]  # the summary is the world's
    assert cl.device.measured.reshard_seconds(2) == table[2]
    assert cl.device.measured.reshard_seconds(3) == table[4]  # nearest in log space
    assert cl.device.measured.reshard_seconds(64) == table[4]


# ------------------------------------------------------------------------- op-level cache


def test_op_cache_keys_are_stable_and_reused(gpt_tiny_graph, tmp_path):
    from autoplan.profiler.ops import apply_to_pricing, load_op_times, op_key, profile_ops

    assert op_key("linear", "linear", [(8, 32, 64), (256, 64)], ["fp32", "fp32"], (8, 32, 256), "fp32") == \
        "linear|fp32|(8,32,64):fp32x(256,64):fp32->(8,32,256)|"
    g = gpt_tiny_graph
    cache = tmp_path / "ops.json"
    meshes = [(2,), (2, 2)]
    first = profile_ops(g, meshes, 4, "fp32", cache, budget_s=0.002, max_reps=3, threads=1)
    assert first.stats["timed"] > 10 and first.stats["reused"] == 0
    keys = set(json.loads(cache.read_text())["entries"])
    assert keys == set(first.fwd)
    kinds = {k.split("|")[0] for k in keys}
    assert {"linear", "sdpa", "layer_norm", "embedding"} <= kinds
    second = profile_ops(g, meshes, 4, "fp32", cache, budget_s=0.002, max_reps=3, threads=1)
    assert second.stats["timed"] == 0 and second.stats["reused"] == first.stats["timed"] + first.stats["reused"]
    assert set(json.loads(cache.read_text())["entries"]) == keys
    # lookup by node + strategy, and use in a mesh's prices
    times = load_op_times(cache)
    cl = load_cluster("cpu")
    from autoplan.repeats import find_repeats as _fr
    tying = _fr(g)
    mp = price_mesh(g, tying, Mesh((2, 2), ("dp", "tp")), cl, "fp32")
    lin = next(i for i, n in enumerate(mp.reps) if g.nodes[n].kind == "linear")
    node = g.nodes[mp.reps[lin]]
    per = times.node_seconds(g, node, mp.strategies[lin], (2, 2), 4, "fp32")
    assert np.isfinite(per).any()
    before = mp.fwd_compute[lin].at(4).copy()
    assert apply_to_pricing(mp, g, times, 4, "fp32") > 0
    after = mp.fwd_compute[lin].at(4)
    ok = np.isfinite(per)
    assert np.allclose(after[ok], per[ok]) and not np.allclose(before[ok], after[ok])
