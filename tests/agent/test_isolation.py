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


IDLE_PROBE = """
import sys
import agent.__main__
heavy = {"numpy", "onnxruntime", "tokenizers"}
print(",".join(sorted({name.split(".")[0] for name in sys.modules} & heavy)))
"""


def test_an_idle_agent_loads_no_inference_library():
    """numpy, onnxruntime and tokenizers are about 55 MB of RSS: they load with the first model."""
    result = subprocess.run([sys.executable, "-c", IDLE_PROBE], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "", f"starting the agent imports {result.stdout.strip()}"
