"""Cost model: collective formulas, resharding transitions, links per mesh axis, profiles."""
from __future__ import annotations

import math

import pytest
import yaml

from autoplan.cost.comm import collective_seconds, dual, transition
from autoplan.errors import UnknownClusterError
from autoplan.hardware import PROFILES_DIR, Link, list_clusters, load_cluster
from autoplan.mesh import Mesh, candidate_meshes, parse_mesh
from autoplan.errors import AutoplanError
from autoplan.strategies.placement import P, R, Shard

LINK = Link(bandwidth_bytes_per_s=100e9, latency_s=0.0, efficiency=1.0)


def test_ring_all_reduce_moves_twice_the_data_of_an_all_gather():
    n, nbytes = 8, 1e9
    ar = collective_seconds("all_reduce", nbytes, n, LINK)
    ag = collective_seconds("all_gather", nbytes, n, LINK)
    assert ar == pytest.approx(2 * (n - 1) / n * nbytes / 100e9)
    assert ag == pytest.approx((n - 1) / n * nbytes / 100e9)
    assert collective_seconds("all_reduce", nbytes, 1, LINK) == 0.0


def test_latency_term_is_capped_by_a_tree_for_large_groups():
    link = Link(1e12, 1e-5, 1.0)
    small = collective_seconds("all_reduce", 1.0, 4, link)
    big = collective_seconds("all_reduce", 1.0, 1024, link)
    assert small == pytest.approx(4 * 1e-5, rel=1e-3)  # min(ring 6, tree 2*log2(4)=4)
    assert big == pytest.approx(20 * 1e-5, rel=1e-3)


@pytest.mark.parametrize(
    "src,dst,kinds",
    [
        ((Shard(0),), (R,), ["all_gather"]),
        ((P,), (R,), ["all_reduce"]),
        ((P,), (Shard(1),), ["reduce_scatter"]),
        ((Shard(0),), (Shard(1),), ["all_to_all"]),
        ((R,), (Shard(0),), []),
        ((R,), (P,), []),
        ((Shard(0), P), (R, R), ["all_reduce", "all_gather"]),  # reduce the shard, then gather
    ],
)
def test_transitions_issue_the_collectives_of_dtensor_redistribute(src, dst, kinds):
    colls = transition((8, 8), 4, src, dst, (2,) * len(src))
    assert [c.kind for c in colls] == kinds


def test_all_gather_bytes_are_the_gathered_output_per_device():
    (c,) = transition((8, 16), 2, (Shard(0),), (R,), (4,))
    assert c.nbytes == 8 * 16 * 2


def test_gradient_of_a_partial_value_is_replicated():
    assert dual((P, Shard(0), R)) == (R, Shard(0), R)


def test_inner_mesh_axis_inside_a_node_uses_nvlink_and_outer_axis_uses_infiniband():
    c = load_cluster("dgx-h100")
    links = Mesh((16, 8), ("dp", "tp")).links(c)
    assert links == (c.inter_node, c.intra_node)
    assert Mesh((8,), ("dp",)).links(c) == (c.intra_node,)
    assert Mesh((16,), ("dp",)).links(c) == (c.inter_node,)


def test_candidate_meshes_keep_the_inner_axis_inside_a_node():
    meshes = candidate_meshes(64, 8)
    assert Mesh((64,), ("dp",)) in meshes and Mesh((8, 8), ("dp", "tp")) in meshes
    assert all(m.shape[-1] <= 8 for m in meshes if m.ndim == 2)
    assert all(m.size == 64 for m in meshes)


def test_parse_mesh_names_the_arithmetic_when_sizes_do_not_multiply_to_the_devices():
    assert parse_mesh("dp=2,tp=4", 8).as_dict() == {"dp": 2, "tp": 4}
    with pytest.raises(AutoplanError, match=r"dp\(2\) \* tp\(2\) = 4 != devices\(8\)"):
        parse_mesh("dp=2,tp=2", 8)
    with pytest.raises(AutoplanError, match="name=size"):
        parse_mesh("dp2", 8)


def test_every_number_in_every_shipped_profile_names_its_source():
    assert {"dgx-a100-80gb", "dgx-h100", "dgx-h200", "cpu"} <= set(list_clusters())
    for name in list_clusters():
        tree = yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())

        def walk(node, path=""):
            if isinstance(node, dict) and "value" in node:
                assert node.get("source"), f"{name}: {path} has no source"
                return
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{path}.{k}")
            elif isinstance(node, (int, float)):
                raise AssertionError(f"{name}: {path} is a bare number without a source")

        walk({k: v for k, v in tree.items() if k not in ("schema", "name", "description")})
        c = load_cluster(name)
        assert c.device.memory_bytes > 0 and c.intra_node.bandwidth_bytes_per_s > 0


def test_datasheet_figures_are_decimal_as_published():
    h100 = load_cluster("dgx-h100")
    assert h100.device.memory_bandwidth_bytes_per_s == 3.35e12
    assert h100.device.peak_flops_per_s["bf16"] == pytest.approx(989.4e12)
    assert load_cluster("dgx-a100-80gb").device.peak_flops_per_s["bf16"] == 312e12


def test_unknown_cluster_error_lists_the_profiles(tmp_path):
    with pytest.raises(UnknownClusterError, match="use one of .*dgx-h100"):
        load_cluster("dgx-h101")
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: autoplan-profile/1\ndevice: {}\n")
    with pytest.raises(UnknownClusterError, match="peak_flops_per_s"):
        load_cluster(str(bad))
    assert math.isfinite(load_cluster(str(PROFILES_DIR / "cpu.yaml")).device.memory_bytes)


def test_parameter_collectives_pay_latency_once_per_bucket_or_fsdp_unit(gpt_tiny_graph):
    from autoplan.cost.comm import BUCKET_BYTES, Bucket
    from autoplan.cost.model import param_buckets
    from autoplan.repeats import find_repeats

    link = Link(bandwidth_bytes_per_s=1e9, latency_s=1e-3, efficiency=1.0)
    b = Bucket(unit=4e6)
    # a gradient all-reduce is a 1/25 share of a 25 MiB DDP bucket; a gather a quarter of its 4 MB FSDP unit
    assert collective_seconds("all_reduce", BUCKET_BYTES / 25, 4, link, b) == pytest.approx(
        collective_seconds("all_reduce", BUCKET_BYTES, 4, link) / 25)
    assert collective_seconds("all_gather", 1e6, 4, link, b) == pytest.approx(collective_seconds("all_gather", 4e6, 4, link) / 4)
    assert collective_seconds("all_gather", 8e6, 4, link, b) == collective_seconds("all_gather", 8e6, 4, link)  # larger than the unit
    graph = gpt_tiny_graph
    tying = find_repeats(graph)
    units = param_buckets(graph, tying, "fp32")
    block = {u.unit for n, u in units.items() if n in tying.in_block}
    assert len(block) == 1  # every block parameter: the same unit, one block's parameters
    per_block = sum(math.prod(graph.nodes[n].out.shape(1)) * 4 for n in units if n in tying.in_block)
    assert block == {per_block}


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_saved_activation_memory_is_what_autograd_keeps(name):
    """The cost model's activation bytes (one micro-batch, fp32, one device) equal the bytes of the
    tensors autograd really saves for backward (unique storages, parameters excluded), within 3%."""
    import torch

    from autoplan.api import prepare_job
    from autoplan.inputs import cross_entropy
    from autoplan.cost.model import price_mesh
    from autoplan.mesh import Mesh
    from autoplan.models import resolve_model

    batch, seq = 4, 64
    job = prepare_job(name, cluster="cpu", devices=1, global_batch=batch, seq_len=seq)
    mp = price_mesh(job.graph, job.tying, Mesh((1,), ("dp",)), job.cluster, "fp32")
    predicted = sum(job.tying.count[n] * float(a.at(batch)[0]) for n, a in zip(mp.reps, mp.act_bytes))

    torch.manual_seed(0)
    model = resolve_model(name).build()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, 64, (batch, seq + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy(model(x[:, :-1]), x[:, 1:])
    assert predicted == pytest.approx(sum(saved.values()), rel=0.03)
