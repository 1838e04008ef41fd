"""The declarative rollout file of ``edgefleet rollouts apply -f rollout.yaml``.

It is checked whole before any call to the plane; every problem is reported with its line::

    name: minilm 3 to the lab
    version: minilm-embedder:3          # an id, model:number or model:alias, resolved now
    # alias: minilm-embedder:stable     # or follow an alias: resolved again when the rollout starts
    selector:
      tags: [lab]                       # and/or devices: [id, ...]
      hardware_class: linux-x86_64      # optional
    max_per_minute: 100                 # optional
    baseline: previous_version          # or control
    stages:
      - name: canary
        device_count: 1                 # or percent: 5 (cumulative share of the selection)
        min_soak_seconds: 600
        gates:
          failure: {percent: 0, min_finished: 1}
          health: {p95_ratio: 1.2, error_points: 1, min_samples: 200}
      - name: everyone
        percent: 100
        gates:
          success: {percent: 95}

Gate settings map to the API's stage fields: ``failure: {percent: 5}`` is ``failure_percent: 5``.
A stage's ``devices:`` is still read as ``device_count:``, its former name, with a warning.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

from edgefleet_client.errors import EdgefleetError

HARDWARE_CLASSES = ("any", "linux-x86_64", "linux-aarch64", "darwin-arm64")
BASELINES = ("previous_version", "control")
MAX_STAGES = 20
TOP_KEYS = ("name", "version", "alias", "selector", "stages", "max_per_minute", "baseline")
SELECTOR_KEYS = ("tags", "devices", "hardware_class")
STAGE_KEYS = ("name", "percent", "device_count", "min_soak_seconds", "gates", "hold")
# Former names still read, each with a warning: in a stage, ``devices`` was the device count
# (while ``selector.devices`` is a list of ids, as it stays).
DEPRECATED_STAGE_KEYS = {"devices": "device_count"}
STAGES_EXAMPLE = "[{name: canary, device_count: 1}, {percent: 100}]"
# A stage held by a gate that cannot judge: how long it may wait, then what the plane does.
HOLD_KEYS = ("timeout", "action")
HOLD_ACTIONS = ("hold", "rollback", "notify")
# gate -> setting -> (kind, minimum, maximum); the API field is f"{gate}_{setting}".
GATES: dict[str, dict[str, tuple[str, float, float | None]]] = {
    "success": {"percent": ("number", 0, 100)},
    "failure": {"percent": ("number", 0, 100), "min_finished": ("int", 1, None)},
    "health": {
        "p95_ratio": ("number", 0, None),
        "error_points": ("number", 0, 100),
        "min_samples": ("int", 1, None),
        # Generative models: time to first token p95 at most, decode tok/s at least, × the baseline's.
        "ttft_ratio": ("number", 0, None),
        "tps_ratio": ("number", 0, None),
    },
}


@dataclass(frozen=True)
class Problem:
    line: int
    where: str
    message: str


class SpecInvalid(EdgefleetError):
    """The rollout file has problems; ``problems`` has each with its line."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = sorted(problems, key=lambda p: p.line)
        lines = [f"{source}:{p.line}: {p.where + ': ' if p.where else ''}{p.message}" for p in self.problems]
        super().__init__(f"{source} is not a valid rollout ({len(lines)} problem(s)):\n" + "\n".join(lines))


@dataclass
class RolloutSpec:
    """A checked rollout file: the API body, less the version (a reference the plane resolves)."""

    body: dict[str, Any]
    version: str | int | None
    # Where each stage starts in the file, to point the plane's own refusals at a line.
    stage_lines: list[int] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)
    # What the file should change but that still works, e.g. a deprecated key.
    warnings: list[Problem] = field(default_factory=list)

    def warning_lines(self, source: str) -> list[str]:
        return [f"{source}:{w.line}: {w.where + ': ' if w.where else ''}{w.message}" for w in self.warnings]


def load(text: str, source: str = "rollout.yaml") -> RolloutSpec:
    """Parse and check a rollout file; ``SpecInvalid`` lists every problem with its line."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecInvalid(source, [Problem(line, "", f"not valid YAML: {problem}")]) from None
    finally:
        loader.dispose()
    checker = _Checker(yaml.SafeLoader(""))
    spec = checker.rollout(root)
    if checker.problems:
        raise SpecInvalid(source, checker.problems)
    assert spec is not None
    spec.warnings = sorted(checker.warnings, key=lambda w: w.line)
    return spec


class _Checker:
    def __init__(self, constructor: yaml.SafeLoader) -> None:
        self.constructor = constructor
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def fail(self, node: yaml.Node, where: str, message: str) -> None:
        self.problems.append(Problem(node.start_mark.line + 1, where, message))

    def warn(self, node: yaml.Node, where: str, message: str) -> None:
        self.warnings.append(Problem(node.start_mark.line + 1, where, message))

    def rollout(self, root: yaml.Node | None) -> RolloutSpec | None:
        if root is None:
            self.problems.append(Problem(1, "", "the file is empty: it needs a version, a selector and stages"))
            return None
        top = self.mapping(root, "", TOP_KEYS)
        if top is None:
            return None
        body: dict[str, Any] = {}
        lines = {key: node.start_mark.line + 1 for key, node in top.items()}
        if "name" in top:
            body["name"] = self.text(top["name"], "name", max_length=200)
        version = self.version(top, root)
        if "alias" in top:
            body["alias"] = self.reference(top["alias"], "alias", alias=True)
        if "selector" in top:
            body["selector"] = self.selector(top["selector"])
        else:
            self.fail(root, "", "missing 'selector': the devices to release to (tags and/or devices)")
        stage_lines: list[int] = []
        if "stages" in top:
            body["stages"], stage_lines = self.stages(top["stages"])
        else:
            self.fail(root, "", f"missing 'stages': at least one, e.g. {STAGES_EXAMPLE}")
        if "max_per_minute" in top:
            body["max_per_minute"] = self.integer(top["max_per_minute"], "max_per_minute", minimum=1)
        if "baseline" in top:
            body["baseline"] = self.choice(top["baseline"], "baseline", BASELINES)
        return RolloutSpec(body=body, version=version, stage_lines=stage_lines, lines=lines)

    def version(self, top: dict[str, yaml.Node], root: yaml.Node) -> str | int | None:
        if ("version" in top) == ("alias" in top):
            self.fail(
                top.get("alias", root),
                "",
                "give a 'version' (id or model:number) or an 'alias' (model:alias) to follow, not both"
                if "alias" in top
                else "missing 'version': an id, model:number or model:alias (or 'alias' to follow one)",
            )
        if "version" not in top:
            return None
        value = self.value(top["version"])
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return self.reference(top["version"], "version", alias=False)

    def reference(self, node: yaml.Node, where: str, *, alias: bool) -> str:
        value = self.value(node)
        model, _, ref = str(value).rpartition(":") if isinstance(value, str) else ("", "", "")
        if not model or not ref:
            example = "minilm-embedder:stable" if alias else "minilm-embedder:3 (or an id)"
            self.fail(node, where, f"write model:{'alias' if alias else 'number'}, e.g. {example}; got {value!r}")
        elif alias and ref.isdigit():
            self.fail(node, where, f"{value!r} names a version number, not an alias: use 'version' for it")
        return str(value)

    def selector(self, node: yaml.Node) -> dict[str, Any]:
        fields = self.mapping(node, "selector", SELECTOR_KEYS)
        if fields is None:
            return {}
        out: dict[str, Any] = {}
        for key in ("tags", "devices"):
            if key in fields:
                out[key] = self.strings(fields[key], f"selector.{key}")
        if "hardware_class" in fields:
            out["hardware_class"] = self.choice(fields["hardware_class"], "selector.hardware_class", HARDWARE_CLASSES)
        if not out.get("tags") and not out.get("devices"):
            self.fail(node, "selector", "select devices by 'tags', by 'devices' (ids), or both")
        return out

    def stages(self, node: yaml.Node) -> tuple[list[dict[str, Any]], list[int]]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.fail(node, "stages", f"a list of at least one stage, e.g. {STAGES_EXAMPLE}")
            return [], []
        if len(node.value) > MAX_STAGES:
            self.fail(node, "stages", f"at most {MAX_STAGES} stages; this has {len(node.value)}")
        stages = [self.stage(item, f"stages[{index + 1}]") for index, item in enumerate(node.value)]
        return stages, [item.start_mark.line + 1 for item in node.value]

    def stage(self, node: yaml.Node, where: str) -> dict[str, Any]:
        fields = self.mapping(node, where, STAGE_KEYS, deprecated=tuple(DEPRECATED_STAGE_KEYS))
        if fields is None:
            return {}
        out: dict[str, Any] = {}
        if "name" in fields:
            out["name"] = self.text(fields["name"], f"{where}.name", max_length=64)
        count = self.device_count(fields, where)
        if ("percent" in fields) == (count is not None):
            self.fail(node, where, "give the stage a 'percent' of the selection or a 'device_count', not both")
        if "percent" in fields:
            out["percent"] = self.number(fields["percent"], f"{where}.percent", minimum=0, maximum=100, above=True)
        if count is not None:
            key, value = count
            out["device_count"] = self.integer(value, f"{where}.{key}", minimum=1)
        if "min_soak_seconds" in fields:
            out["min_soak_seconds"] = self.integer(fields["min_soak_seconds"], f"{where}.min_soak_seconds", minimum=0)
        if "gates" in fields:
            out.update(self.gates(fields["gates"], f"{where}.gates"))
        if "hold" in fields:
            out.update(self.hold(fields["hold"], f"{where}.hold"))
        return out

    def device_count(self, fields: dict[str, yaml.Node], where: str) -> tuple[str, yaml.Node] | None:
        """The stage's device count and the key it was given under; ``devices`` is its former name."""
        if "devices" not in fields:
            return ("device_count", fields["device_count"]) if "device_count" in fields else None
        if "device_count" in fields:
            self.fail(fields["devices"], f"{where}.devices", "give 'device_count' alone: 'devices' is its former name")
        else:
            self.warn(fields["devices"], f"{where}.devices", "deprecated: write 'device_count', its new name")
        return "devices", fields["devices"]

    def hold(self, node: yaml.Node, where: str) -> dict[str, Any]:
        fields = self.mapping(node, where, HOLD_KEYS) or {}
        out: dict[str, Any] = {}
        if "timeout" in fields:
            out["inconclusive_timeout"] = self.integer(fields["timeout"], f"{where}.timeout", minimum=1)
        if "action" in fields:
            action = self.value(fields["action"])
            if action not in HOLD_ACTIONS:
                self.fail(fields["action"], f"{where}.action", f"expected one of {', '.join(HOLD_ACTIONS)}")
            else:
                out["inconclusive_action"] = action
        return out

    def gates(self, node: yaml.Node, where: str) -> dict[str, Any]:
        gates = self.mapping(node, where, tuple(GATES))
        out: dict[str, Any] = {}
        for gate, gate_node in (gates or {}).items():
            settings = self.mapping(gate_node, f"{where}.{gate}", tuple(GATES[gate]))
            for setting, value in (settings or {}).items():
                kind, low, high = GATES[gate][setting]
                path = f"{where}.{gate}.{setting}"
                if kind == "int":
                    out[f"{gate}_{setting}"] = self.integer(value, path, minimum=int(low))
                else:
                    out[f"{gate}_{setting}"] = self.number(value, path, minimum=low, maximum=high)
        return out

    # --- Scalars -----------------------------------------------------------------

    def mapping(
        self, node: yaml.Node, where: str, allowed: tuple[str, ...], deprecated: tuple[str, ...] = ()
    ) -> dict[str, yaml.Node] | None:
        """The mapping's keys and values; ``deprecated`` keys are taken too, but not suggested."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, where, f"expected a mapping with {', '.join(allowed)}")
            return None
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = str(self.value(key_node))
            if key not in allowed and key not in deprecated:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; expected one of {', '.join(allowed)}"
                self.fail(key_node, where, f"unknown key '{key}'{hint}")
            elif key in out:
                self.fail(key_node, where, f"'{key}' is given twice")
            else:
                out[key] = value_node
        return out

    def value(self, node: yaml.Node) -> Any:
        return self.constructor.construct_object(node, deep=True)

    def text(self, node: yaml.Node, where: str, *, max_length: int) -> str:
        value = self.value(node)
        if not isinstance(value, str) or not value.strip():
            self.fail(node, where, "expected some text")
            return ""
        if len(value) > max_length:
            self.fail(node, where, f"at most {max_length} characters")
        return value

    def strings(self, node: yaml.Node, where: str) -> list[str]:
        value = self.value(node)
        if not isinstance(value, list) or not all(isinstance(item, str | int) for item in value):
            self.fail(node, where, "expected a list of names, e.g. [lab, floor-2]")
            return []
        return [str(item) for item in value]

    def choice(self, node: yaml.Node, where: str, choices: tuple[str, ...]) -> str:
        value = self.value(node)
        if value not in choices:
            self.fail(node, where, f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    def integer(self, node: yaml.Node, where: str, *, minimum: int) -> int:
        value = self.value(node)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(node, where, f"expected a whole number of at least {minimum}; got {value!r}")
            return 0
        return value

    def number(self, node: yaml.Node, where: str, *, minimum: float, maximum: float | None, above: bool = False) -> str:
        value = self.value(node)
        number = None
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                number = Decimal(str(value))
            except InvalidOperation:
                pass
        low_ok = number is not None and (number > Decimal(minimum) if above else number >= Decimal(minimum))
        if number is None or not number.is_finite() or not low_ok or (maximum is not None and number > maximum):
            bounds = f"more than {minimum}" if above else f"at least {minimum}"
            if maximum is not None:
                bounds += f" and at most {maximum}"
            self.fail(node, where, f"expected a number {bounds}; got {value!r}")
            return "0"
        # As text: the API's decimal fields take it exactly, with no float rounding on the way.
        return str(number)
