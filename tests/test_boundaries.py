"""The boundaries docs/architecture.md draws, checked on the real import graph (grimp, as import-linter reads it)."""

import grimp

# The wire contract: topics and message schemas, chunk maths, and signature formats. The only
# agent code the plane may import; everything else of the agent is the device's business.
CONTRACT = {"agent.wire", "agent.manifest", "agent.signing"}


def test_it_lets_the_plane_import_only_the_agents_wire_contract():
    graph = grimp.build_graph("fleet", "agent", "controlplane")
    plane = {m for m in graph.modules if m.split(".")[0] in ("fleet", "controlplane")}

    imported = {
        found
        for module in plane
        for found in graph.find_modules_directly_imported_by(module)
        if found.startswith("agent")
    }

    assert imported <= CONTRACT, f"the plane imports {sorted(imported - CONTRACT)}, outside the wire contract"


def test_it_keeps_the_wire_contract_free_of_the_rest_of_the_agent():
    graph = grimp.build_graph("agent")

    for module in CONTRACT:
        outside = {m for m in graph.find_modules_directly_imported_by(module) if m.startswith("agent")} - CONTRACT
        assert not outside, f"{module} imports {sorted(outside)}: the plane would import them too"
