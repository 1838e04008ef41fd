import subprocess
import sys

from tests.support import REPO

PROBE = """
import pkgutil, importlib, sys
import agent
for module in pkgutil.walk_packages(agent.__path__, "agent."):
    importlib.import_module(module.name)
plane = {"django", "rest_framework", "celery", "fleet", "controlplane"}
leaked = sorted({name.split(".")[0] for name in sys.modules} & plane)
print(",".join(leaked))
"""


def test_it_imports_every_agent_module_without_the_plane():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "", f"agent/ pulls in {result.stdout.strip()}"
