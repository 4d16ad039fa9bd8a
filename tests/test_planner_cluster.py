"""The planner learns a cluster: `cpu-cluster` prices groups that cross nodes by the measured link
between nodes, which the ranks of a node share, and the calibration on paratrain.cluster measures
that link at the rate its tbf qdiscs set."""

import importlib
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


# ------------------------------------------------------------------ `plan --calibrate --nodes`
@pytest.mark.parametrize("flags, message", [
    (["--nodes", "2"], "--nodes: builds a cluster on this machine for --calibrate"),
    (["--rate", "1gbit"], "--rate: builds a cluster"),
    (["--calibrate", "--ranks-per-node", "2"], "--ranks-per-node: describes the cluster of --calibrate --nodes N"),
    (["--calibrate", "--nodes", "1"], "at least 2 nodes"),
    (["--calibrate", "--nodes", "2", "--ranks-per-node", "0"], "at least 2 nodes of at least 1 rank"),
    (["--calibrate", "--nodes", "2", "--rate", "fast"], "not a tc rate"),
    (["--calibrate", "--nodes", "2", "--gpu", "h100-80gb"], "use --gpu cpu-cluster"),
    (["--calibrate", "--gpu", "cpu-cluster"], "use --gpu cpu-local"),
    (["--model", "small", "--allreduce", "fastest"], "--allreduce: must be one of backend, ring, tree"),
])
def test_plan_refuses_bad_cluster_flags_in_one_line_before_measuring(cache, capsys, monkeypatch, flags, message):
    calibrate = importlib.import_module("paratrain.planner.calibrate")  # the module, not its function

    def measured(*a, **k):
        raise AssertionError("measured although the flags are bad")
    monkeypatch.setattr(calibrate, "calibrate", measured)
    monkeypatch.setattr(calibrate, "calibrate_cluster", measured)
    with pytest.raises(SystemExit) as e:
        main(["plan", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(cache.iterdir())


def test_plan_calibrate_nodes_refuses_where_no_cluster_can_be_built(cache, capsys, monkeypatch):
    import paratrain.cluster

    monkeypatch.setattr(paratrain.cluster, "available", lambda: "a cluster on one machine needs root")
    with pytest.raises(SystemExit) as e:
        main(["plan", "--calibrate", "--nodes", "2", "--model", "small"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.strip() == "paratrain: error: --calibrate --nodes: a cluster on one machine needs root"


def test_plan_calibrate_nodes_measures_the_cluster_then_plans_on_it(cache, capsys, monkeypatch):
    """--calibrate --nodes N --ranks-per-node R --rate: cpu-local first (none saved yet), then the
    cluster; the plan that follows prices N x R ranks of cpu-cluster, R a node."""
    import paratrain.cluster

    calibrate = importlib.import_module("paratrain.planner.calibrate")
    calls = []
    monkeypatch.setattr(paratrain.cluster, "available", lambda: None)
    monkeypatch.setattr(calibrate, "calibrate", lambda log=print: calls.append("cpu-local"))

    def fake_cluster(nodes, ranks_per_node, rate, log=print):
        calls.append((nodes, ranks_per_node, rate))
        write_cluster(cache, ranks_per_node=ranks_per_node, nodes=nodes)
    monkeypatch.setattr(calibrate, "calibrate_cluster", fake_cluster)
    assert main(["plan", "--calibrate", "--nodes", "3", "--ranks-per-node", "2", "--rate", "100mbit",
                 "--model", "small", "--global-batch", "12", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert calls == ["cpu-local", (3, 2, "100mbit")]
    assert "on 6 x cpu-cluster (2 per node)" in out and "links measured on 3 nodes x 2 ranks" in out and "fp32" in out
    calls.clear()
    assert main(["plan", "--calibrate", "--nodes", "2", "--rate", "none"]) == 0  # defaults: 2 a node, no limit
    assert calls == ["cpu-local", (2, 2, None)]


# ------------------------------------------------------------------ the data-parallel all-reduce algorithms
def dp4(cache, allreduce, gpus_per_node=2, **kw):
    write_cluster(cache)
    return estimate(PRESETS["small"], 128, 8, Candidate(dp=4, allreduce=allreduce, **kw), cpu_cluster(),
                    gpus_per_node=gpus_per_node)


def test_backend_all_reduce_is_priced_as_before_and_says_so(cache):
    e = dp4(cache, "backend")
    grads = 4 * 3_290_624
    assert e.allreduce == "backend" and e.as_dict()["allreduce"] == "backend"
    assert e.dp_comm_s == pytest.approx(1.5 * grads / RATE + 6 * 5e-4, rel=0.01)


def test_our_all_reduce_algorithms_are_priced_by_comm_algorithms_model(cache):
    from paratrain.comm.algorithms import predicted_times

    grads = 4 * 3_290_624  # one bucket
    links = {"intra": Link(**INTRA["p2p"]), "inter": Link(**INTER["p2p"])}
    model = predicted_times(grads, 4, 2, links)
    for algorithm in ("ring", "tree", "hierarchical"):
        e = dp4(cache, algorithm)
        assert e.allreduce == algorithm and e.dp_comm_s == pytest.approx(model[algorithm], rel=1e-3), algorithm
    auto = dp4(cache, "auto")
    assert auto.allreduce == min(model, key=model.get) and auto.dp_comm_s == pytest.approx(min(model.values()))


def test_hierarchical_is_cheaper_than_a_ring_across_nodes_for_large_gradients(cache):
    """Horovod's scheme sends S per node link against the flat ring's 1.5 S (2 nodes of 2), and
    inside one node there is nothing for it to save."""
    ring, hier = dp4(cache, "ring"), dp4(cache, "hierarchical")
    assert hier.dp_comm_s < 0.8 * ring.dp_comm_s and hier.step_time_s < ring.step_time_s
    one_node = dp4(cache, "hierarchical", gpus_per_node=4)  # one level: the backend's all-reduce
    assert one_node.allreduce == "backend" and one_node.dp_comm_s == dp4(cache, "backend", gpus_per_node=4).dp_comm_s
    assert dp4(cache, "ring", zero=1).allreduce == "backend"  # ZeRO reduce-scatters with the backend


def test_groups_that_cross_a_node_link_at_once_share_it(cache):
    """dp=2 x tp=2 on 2 x 2: both dp groups reduce through each node's one link at the same time."""
    write_cluster(cache)
    hw, cfg = cpu_cluster(), PRESETS["small"]
    e = estimate(cfg, 128, 8, Candidate(dp=2, tp=2), hw, gpus_per_node=2)
    from paratrain.planner.cost import rank_params
    grads = 4 * rank_params(cfg, cfg.n_layer, True, True, 2, 1)
    assert e.dp_comm_s == pytest.approx(grads / (RATE / 2) + 2 * 5e-4, rel=0.01)  # a 2-rank ring at half the link


def test_plan_prices_the_all_reduce_it_is_asked_for(cache, capsys):
    write_cluster(cache)
    flags = ["plan", "--gpu", "cpu-cluster", "--model", "small", "--global-batch", "8", "--seq-len", "128",
             "--top", "3"]
    assert main([*flags, "--allreduce", "auto", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["allreduce"] for r in rows if r["dp"] > 1 and r["zero"] == 0} <= {"ring", "tree", "hierarchical"}
    assert main([*flags, "--allreduce", "hierarchical"]) == 0
    assert "data-parallel all-reduce: hierarchical" in capsys.readouterr().out


@pytest.mark.slow  # 22 s; the two-node calibration itself stays in the default run
def test_plan_calibrate_nodes_on_the_harness_then_plans(cache, capsys):
    """`paratrain plan --calibrate --nodes 2 --ranks-per-node 2 --rate 1gbit --model small` on a real
    cluster of this machine (a saved cpu-local spares its calibration): the link's rate measured,
    and the plan priced on it."""
    needs_a_cluster()
    write_cpu_local(cache)
    assert main(["plan", "--calibrate", "--nodes", "2", "--ranks-per-node", "2", "--rate", "1gbit", "--model", "small",
                 "--global-batch", "8", "--seq-len", "128", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "on 4 x cpu-cluster (2 per node)" in out and "links measured on 2 nodes x 2 ranks at 1gbit" in out
    inter = json.loads((cache / "cpu-cluster.json").read_text())["links"]["inter"]["all_reduce"]
    assert RATE / 2 < inter["beta"] < RATE * 2


def write_cpu_local(cache):
    """A saved cpu-local for this machine (its figures made up)."""
    cores = local_cores()
    measured = {"gemm": [[1e6, 1e10], [1e9, 4e10]], "attn": [[1e6, 5e9]],
                "elem": {"gelu": 1e-9, "layer_norm": 2e-9, "softmax": 3e-9, "adamw": 4e-9, "bw": 1e10}}
    (cache / "cpu-local.json").write_text(json.dumps({
        "cores": cores, "when": "now", "threads": {str(max(1, cores // w)): measured for w in (1, 2, 4)},
        "dispatch_s": 5e-6, "baseline_bytes": 3e8, "collectives": INTRA}))
