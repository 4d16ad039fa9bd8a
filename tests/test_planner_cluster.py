"""The planner learns a cluster: `cpu-cluster` prices groups that cross nodes by the measured link
between nodes, which the ranks of a node share, and the calibration on paratrain.cluster measures
that link at the rate its tbf qdiscs set."""

import json

import pytest

from paratrain.cluster import available
from paratrain.cli import main
from paratrain.models.gpt import PRESETS
from paratrain.planner.cost import Candidate, estimate
from paratrain.planner.hardware import Link, cpu_cluster, get_hardware, local_cores

GB = 1e9
RATE = 0.125 * GB  # 1 Gbit/s in bytes per second
INTRA = {"all_reduce": {"alpha": 1e-4, "beta": 1e9}, "reduce_scatter": {"alpha": 1e-4, "beta": 0.5e9},
         "all_gather": {"alpha": 1e-4, "beta": 0.8e9}, "p2p": {"alpha": 2e-5, "beta": 2e9}}
INTER = {"all_reduce": {"alpha": 5e-4, "beta": RATE}, "reduce_scatter": {"alpha": 1e-3, "beta": RATE / 2},
         "all_gather": {"alpha": 5e-4, "beta": RATE}, "p2p": {"alpha": 3e-5, "beta": RATE}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty calibration folder: cpu-local on its defaults, cpu-cluster on nothing yet."""
    monkeypatch.setenv("PARATRAIN_CACHE", str(tmp_path))
    return tmp_path


def write_cluster(cache, ranks_per_node=2, **extra):
    data = {"nodes": 2, "ranks_per_node": ranks_per_node, "rate": "1gbit", "cores": local_cores(), "when": "now",
            "links": {"intra": INTRA, "inter": INTER}, **extra}
    (cache / "cpu-cluster.json").write_text(json.dumps(data))


def needs_a_cluster():
    reason = available()
    if reason:
        pytest.skip(reason)


def test_cpu_cluster_prices_links_inside_and_between_nodes_from_its_file(cache):
    write_cluster(cache)
    hw = get_hardware("cpu-cluster")
    assert hw.name == "cpu-cluster" and hw.gpus_per_node == 2 and "2 nodes x 2 ranks at 1gbit" in hw.note
    assert hw.link(False) == Link(1e-4, 1e9) and hw.link(False, "reduce_scatter") == Link(1e-4, 0.5e9)
    assert hw.link(True) == Link(5e-4, RATE) and hw.link(1, "reduce_scatter") == Link(1e-3, RATE / 2)
    assert hw.p2p_link(False) == Link(2e-5, 2e9) and hw.p2p_link(True) == Link(3e-5, RATE)
    # two groups through a node's one link split it; a GPU has a NIC of its own
    assert hw.link(2) == Link(5e-4, RATE / 2) and hw.p2p_link(2) == Link(3e-5, RATE / 2)
    h100 = get_hardware("h100-80gb")
    assert h100.link(2) == h100.link(True) == h100.inter
    # a worker's threads are its node's share of the cores, as the launcher gives them
    assert hw.threads(4) == max(1, local_cores() // 2) and get_hardware("cpu-local").threads(4) == max(
        1, local_cores() // 4)


def test_cpu_cluster_without_a_calibration_assumes_1_gbit_and_says_so(cache):
    hw = cpu_cluster()
    assert not hw.calibrated and "--calibrate --nodes 2" in hw.note
    assert hw.inter.beta == RATE and hw.gpus_per_node == 2
    write_cluster(cache, cores=local_cores() + 1)  # another machine's
    assert "not this machine's" in cpu_cluster().note


def test_data_parallel_across_nodes_costs_the_link_between_them(cache):
    write_cluster(cache)
    hw, cfg = get_hardware("cpu-cluster"), PRESETS["small"]
    one_node = estimate(cfg, 128, 8, Candidate(dp=4), hw, gpus_per_node=4)
    two_nodes = estimate(cfg, 128, 8, Candidate(dp=4), hw, gpus_per_node=2)
    grads = 4 * 3_290_624
    assert one_node.dp_comm_s < two_nodes.dp_comm_s
    # a ring over 4 ranks: 2(n-1)/n of the gradients through the link at 125 MB/s, 6 steps of alpha
    assert two_nodes.dp_comm_s == pytest.approx(1.5 * grads / RATE + 6 * 5e-4, rel=0.01)


def test_plan_takes_the_cluster_hardware(cache, capsys):
    write_cluster(cache)
    assert main(["plan", "--gpu", "cpu-cluster", "--model", "small", "--gpus", "4", "--gpus-per-node", "2",
                 "--precision", "fp32", "--global-batch", "8", "--seq-len", "128", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "on 4 x cpu-cluster (2 per node)" in out and "links measured on 2 nodes x 2 ranks" in out


def test_calibration_on_two_nodes_measures_the_rate_of_their_link(cache):
    """2 nodes of 1 rank at 1 Gbit/s: all-reduce and send/recv between them at about 125 MB/s."""
    needs_a_cluster()
    from paratrain.planner.calibrate import measure_cluster

    data = measure_cluster(2, 1, "1gbit", sizes=[4, 1 << 16, 1 << 20, 4 << 20], reference=False, timeout=120)
    inter = data["links"]["inter"]
    assert set(data["links"]) == {"inter"}  # one rank a node: nothing inside a node, no rails
    for op in ("all_reduce", "p2p"):
        assert RATE / 2 < inter[op]["beta"] < RATE * 2, (op, inter[op])


@pytest.mark.slow
def test_calibration_on_two_nodes_of_two_saves_a_cpu_cluster(cache):
    """2 x 2: loopback inside a node is faster than the link, the two rails share it, and
    `cpu-cluster` reads what was saved."""
    needs_a_cluster()
    from paratrain.planner.calibrate import calibrate_cluster

    hw = calibrate_cluster(2, 2, "1gbit", log=lambda m: None)
    data = json.loads((cache / "cpu-cluster.json").read_text())
    links = data["links"]
    assert links["intra"]["all_reduce"]["beta"] > 2 * links["inter"]["all_reduce"]["beta"]
    assert RATE / 2 < links["inter"]["all_reduce"]["beta"] < RATE * 2
    assert links["rails"]["all_reduce"]["beta"] < 0.75 * links["inter"]["all_reduce"]["beta"]
    assert hw.gpus_per_node == 2 and hw.inter.beta == links["inter"]["all_reduce"]["beta"]


def test_a_cluster_calibration_refuses_one_node_or_a_bad_rate_in_one_line(cache):
    from paratrain.planner.calibrate import calibrate_cluster

    with pytest.raises(ValueError, match="at least 2 nodes"):
        calibrate_cluster(1, 2)
    with pytest.raises(ValueError, match="not a tc rate"):
        calibrate_cluster(2, 2, "fast")
    assert not (cache / "cpu-cluster.json").exists()
