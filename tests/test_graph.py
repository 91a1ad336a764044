"""meshmq graph: the topology as Graphviz DOT or Mermaid."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import meshmq
from meshmq._graph import Topology, to_dot, to_mermaid


def _topology() -> Topology:
    t = Topology()
    t.add_node("orders", "n1")
    t.add_node("inventory", "n2")
    t.add_node("inventory", "n3")
    t.add_subscription("orders.*", "inventory", "stock")
    t.add_subscription("orders.placed", "billing", None)
    t.add_flow("orders", "orders.placed", 12)
    return t


def test_dot_names_services_patterns_subscriptions_and_traffic() -> None:
    dot = to_dot(_topology(), "shop")
    assert dot.startswith('digraph "mesh shop" {') and dot.endswith("}")
    assert 'label="inventory\\n2 nodes"' in dot and 'label="orders.*"' in dot
    ids = {line.split('label="')[1].split('"')[0]: line.split()[0]
           for line in dot.splitlines() if "label=" in line and "->" not in line}
    inventory, orders = ids["inventory\\n2 nodes"], ids["orders\\n1 node"]
    assert f'{ids["orders.*"]} -> {inventory} [label="queue stock", style=dashed];' in dot
    assert f'{ids["orders.placed"]} -> {ids["billing"]};' in dot
    assert f'{orders} -> {ids["orders.placed"]} [label="12"];' in dot


def test_mermaid_is_a_flowchart_with_the_same_edges() -> None:
    text = to_mermaid(_topology(), "shop")
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    assert sum("-.->|queue stock|" in line for line in lines) == 1
    assert sum("-->|12|" in line for line in lines) == 1
    assert any('["inventory<br/>2 nodes"]' in line for line in lines)
    weird = Topology()
    weird.add_subscription('a.[b]|"c"', "svc", None)
    assert '["a._b___c_"]' in to_mermaid(weird, "m")  # characters Mermaid would misread are replaced


def test_meshmq_graph_shows_a_running_mesh(mesh: str, tmp_path: Path) -> None:
    cli = importlib.import_module("test_cli")
    with meshmq.Agent("inventory", mesh=mesh, durability="memory") as inventory, \
            meshmq.Agent("billing", mesh=mesh, durability="memory") as billing:
        inventory.subscribe("orders.*", queue="stock")
        billing.subscribe("orders.placed")
        dot = subprocess.run([sys.executable, "-m", "meshmq", "graph", "--mesh", mesh, "--wait", "3"],
                             capture_output=True, text=True, timeout=60, env=cli.cli_env(tmp_path))
        mermaid = subprocess.run([sys.executable, "-m", "meshmq", "graph", "--mermaid", "--mesh", mesh, "--wait", "3"],
                                 capture_output=True, text=True, timeout=60, env=cli.cli_env(tmp_path))
    assert dot.returncode == 0, dot.stderr
    assert 'label="inventory\\n1 node"' in dot.stdout and 'label="orders.*"' in dot.stdout
    assert 'label="queue stock", style=dashed' in dot.stdout and 'label="orders.placed"' in dot.stdout
    assert mermaid.returncode == 0 and mermaid.stdout.startswith("flowchart LR")
    assert "-.->|queue stock|" in mermaid.stdout
