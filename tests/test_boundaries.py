"""The boundaries docs/architecture.md draws, checked on the real import graph (grimp, as import-linter reads it)."""

import grimp

# The wire contract: topics and message schemas, chunk maths, and signature formats. The only
# agent code the plane may import; everything else of the agent is the device's business.
CONTRACT = "agent.contract"


def graph_of(*packages: str) -> grimp.ImportGraph:
    # Uncached: grimp's cache keeps one mtime record per package for every graph that package
    # is part of, so a graph of the agent alone, built before an edit, can be read as fresh after
    # a graph of the agent with the plane was rebuilt.
    return grimp.build_graph(*packages, cache_dir=None)


def in_contract(module: str) -> bool:
    return module == CONTRACT or module.startswith(CONTRACT + ".")


def test_it_lets_the_plane_import_only_agent_contract():
    graph = graph_of("fleet", "agent", "controlplane")
    plane = {m for m in graph.modules if m.split(".")[0] in ("fleet", "controlplane")}

    imported = {
        found
        for module in plane
        for found in graph.find_modules_directly_imported_by(module)
        if found.split(".")[0] == "agent"
    }

    outside = sorted(m for m in imported if not in_contract(m))
    assert not outside, f"the plane imports {outside}, outside agent.contract"
    assert imported, "the plane imports nothing of agent.contract: is the graph read from the right place?"


def test_it_keeps_agent_contract_free_of_the_rest_of_the_agent():
    graph = graph_of("agent")
    contract = {m for m in graph.modules if in_contract(m)}

    for module in sorted(contract):
        outside = {m for m in graph.find_modules_directly_imported_by(module) if m.split(".")[0] == "agent"}
        outside = sorted(m for m in outside if not in_contract(m))
        assert not outside, f"{module} imports {outside}: the plane would import them too"
