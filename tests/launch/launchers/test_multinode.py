"""Two launchers, one per node, over loopback, equal one launcher with all the ranks."""

import subprocess
import sys

from gptdist.telemetry.metrics_file import read_metrics
from tests.helpers import ROOT, assert_ok, cpu_env, launch, write_recipe

STEPS = 10
# tp 2 x dp 2 over 2 nodes x 2 ranks: tensor parallel inside a node, data parallel across nodes, as on GPUs.
LAYOUT = {"tp": 2, "pp": 1, "zero_stage": 1}
TRAIN = {"steps": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "log_every": 5}



def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_node_launchers_match_one_node(tmp_path, corpus, tokenizer_path):
    two_nodes, one_node = tmp_path / "two-nodes", tmp_path / "one-node"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tokenizer_path, two_nodes, train=TRAIN, parallel=LAYOUT)
    port = str(_free_port())
    nodes = []
    for rank in (0, 1):
        env = cpu_env({"NODE_RANK": str(rank), "NUM_NODES": "2", "NODE_HOSTS": "nodeA nodeB", "GPUS_PER_NODE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        nodes.append(subprocess.Popen(["bash", "launch/node.sh", str(recipe)], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [node.communicate(timeout=400)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-6000:]
    assert "node 1 of 2 (nodeA nodeB), 2 ranks" in outputs[1]
    assert [r["step"] for r in read_metrics(two_nodes / "metrics.jsonl") if "loss" in r] == list(range(1, STEPS + 1))

    assert_ok(launch(recipe, [f"run.dir={one_node}"], ranks=4))
    # Same layout, same rank numbering, one thread per rank: the very same arithmetic, so bitwise equal losses.
    verdict = subprocess.run([sys.executable, "-m", "gptdist.cli", "compare-loss", str(one_node), str(two_nodes),
                              "--rtol", "0"], cwd=ROOT, capture_output=True, text=True)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert f"MATCH: {STEPS} common steps" in verdict.stdout
