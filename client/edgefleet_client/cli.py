"""``edgefleet``: the plane's API from a terminal or a CI job (click for commands, rich for output)."""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from edgefleet_client import config, errors, push, spec, watch
from edgefleet_client.api import Client, Json

F = TypeVar("F", bound=Callable[..., Any])

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Settings:
    """The global options, and the client they make (created on first use)."""

    def __init__(self, url: str | None, token: str | None, profile: str | None, output: str) -> None:
        self.url, self.token, self.profile, self.output = url, token, profile, output
        self._client: Client | None = None

    @property
    def json(self) -> bool:
        return self.output == "json"

    def client(self) -> Client:
        if self._client is None:
            target = config.resolve(self.url, self.token, self.profile)
            if not target.token:
                raise errors.ConfigError(
                    f"no API token for {target.url} ({target.source}): run `edgefleet login`, or set EDGEFLEET_TOKEN"
                )
            self._client = Client(target.url, target.token)
        return self._client


def output_option(command: F) -> F:
    """``-o/--output`` on every command too, so it may follow the command as well as precede it."""

    @click.option("-o", "--output", type=click.Choice(["table", "json"]), default=None, help="table (default) or json")
    @functools.wraps(command)
    def wrapper(*args: Any, output: str | None = None, **kwargs: Any) -> Any:
        if output:
            settings().output = output
        return command(*args, **kwargs)

    return cast(F, wrapper)


def settings() -> Settings:
    found = click.get_current_context().find_object(Settings)
    assert found is not None
    return found


def show(data: Any, columns: list[tuple[str, Callable[[Json], Any]]] | None = None, title: str = "") -> None:
    """JSON for scripts, else a table of ``columns`` (or the object's fields)."""
    if settings().json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    rows = data if isinstance(data, list) else [data]
    if columns is None:
        table = Table(show_header=False, title=title or None)
        for key, value in data.items() if isinstance(data, dict) else []:
            table.add_row(key, _cell(value))
        out.print(table)
        return
    table = Table(title=title or None)
    for heading, _ in columns:
        table.add_column(heading)
    for row in rows:
        table.add_row(*(_cell(get(row)) for _, get in columns))
    out.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def say(message: str) -> None:
    """Progress notes: on stderr, so that stdout stays the command's answer."""
    err.print(message, highlight=False)


# --- The group and sign-in ------------------------------------------------------------


class Group(click.Group):
    """Every error the client knows ends the command with one line on stderr: exit 2 for a bad
    rollout file (a usage error), 1 for the rest."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.EdgefleetError as exc:
            err.print(f"error: {exc}", highlight=False, markup=False)
            ctx.exit(2 if isinstance(exc, spec.SpecInvalid) else 1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
# The environment and profiles are read by config.resolve, which knows which one a setting came from.
@click.option("--url", help="The plane, e.g. http://localhost:8000 [env EDGEFLEET_URL]")
@click.option("--token", help="An API token [env EDGEFLEET_TOKEN]")
@click.option("--profile", help="A profile of ~/.config/edgefleet/config.toml [env EDGEFLEET_PROFILE]")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", help="table or json")
@click.version_option("0.1.0", prog_name="edgefleet")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None, profile: str | None, output: str) -> None:
    """Edgefleet's control plane from the command line: models, versions, devices, rollouts.

    Exit codes: 0 success; 1 failure (an API error, or `rollouts watch` saw a rollback or abort);
    2 bad usage or an invalid rollout file; 3 `rollouts watch` saw a stage held past --hold-timeout;
    4 `rollouts watch` reached --timeout.
    """
    ctx.obj = Settings(url, token, profile, output)
    ctx.call_on_close(lambda: ctx.obj._client and ctx.obj._client.close())


@cli.command()
@click.option("--username", prompt=True, help="Your user on the plane")
@click.option("--password", prompt=True, hide_input=True, envvar="EDGEFLEET_PASSWORD", help="[env EDGEFLEET_PASSWORD]")
@click.option("--default", "make_default", is_flag=True, help="Make this profile the default one")
@output_option
def login(username: str, password: str, make_default: bool) -> None:
    """Sign in with a username and password and store the API token in a profile."""
    s = settings()
    target = config.resolve(s.url, None, s.profile, new_profile=True)
    with Client(target.url) as client:
        token = client.login(username, password)
    path = config.save_profile(target.profile, target.url, token, make_default=make_default)
    if s.json:
        click.echo(json.dumps({"profile": target.profile, "url": target.url, "config": str(path)}))
    else:
        say(f"signed in to {target.url} as {username}; token saved to profile '{target.profile}' in {path}")


# --- Models --------------------------------------------------------------------------


@cli.group()
def models() -> None:
    """Models of the registry."""


MODEL_COLUMNS = [("name", lambda m: m["name"]), ("versions", lambda m: m["version_count"]),
                 ("description", lambda m: m["description"]), ("created", lambda m: m["created_at"])]  # fmt: skip


@models.command("list")
@click.option("--name", help="Only models whose name contains this")
@output_option
def models_list(name: str | None) -> None:
    """The registry's models, with how many versions each has."""
    show(settings().client().list_models(name=name), MODEL_COLUMNS)


@models.command("create")
@click.argument("name")
@click.option("--description", default="")
@output_option
def models_create(name: str, description: str) -> None:
    """A new model (lower-case letters, digits, '.', '_' and '-')."""
    show(settings().client().create_model(name, description), MODEL_COLUMNS)


# --- Versions ------------------------------------------------------------------------


@cli.group()
def versions() -> None:
    """Versions of a model: push files, publish, optimize."""


VERSION_COLUMNS = [
    ("id", lambda v: v["id"]),
    ("label", lambda v: v["label"]),
    ("status", lambda v: v["status"]),
    ("artifacts", lambda v: ", ".join(f"{a['filename']} {a['precision'] or ''} {a['status']}" for a in v["artifacts"])),
    ("aliases", lambda v: ", ".join(v["aliases"])),
    ("created", lambda v: v["created_at"]),
]


@versions.command("list")
@click.option("--model")
@click.option("--status", type=click.Choice(["draft", "published", "archived"]))
@output_option
def versions_list(model: str | None, status: str | None) -> None:
    """Versions, newest first."""
    show(settings().client().list_versions(model=model, status=status), VERSION_COLUMNS)


@versions.command("show")
@click.argument("version")
@output_option
def versions_show(version: str) -> None:
    """VERSION: an id, model:number or model:alias."""
    show(settings().client().get_version(version), VERSION_COLUMNS)


@versions.command("push")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True, help="The model the new version belongs to")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), help="Else read from file names")
@click.option("--hardware-class", default="any", type=click.Choice(list(spec.HARDWARE_CLASSES)))
@click.option("--notes", default="")
@click.option(
    "--task",
    type=click.Choice(["embedding", "tensor", "generate"]),
    help="What the model does (a .gguf is a generative model's source: generate)",
)
@click.option("--pooling", type=click.Choice(["mean", "cls", "none"]))
@click.option("--normalize/--no-normalize", default=None)
@click.option("--max-length", type=int)
@click.option("--create-model", is_flag=True, help="Create the model if it does not exist")
@click.option("--publish", is_flag=True, help="Publish the version once its files are ready")
@click.option("--retries", default=3, show_default=True, help="Retries of an upload on connection trouble or 502-504")
@output_option
def versions_push(path: Path, model: str, precision: str | None, hardware_class: str, notes: str,
                  task: str | None, pooling: str | None, normalize: bool | None, max_length: int | None,
                  create_model: bool, publish: bool, retries: int) -> None:  # fmt: skip
    """Create a draft version of a model from PATH: a model file (.onnx or .gguf), or a directory
    of them with its tokenizer.json. Each file is uploaded with a progress bar and retried on
    connection trouble, then waited for until the plane has hashed it."""
    uploads = push.plan_uploads(path, precision=precision, hardware_class=hardware_class)
    client = settings().client()
    if create_model:
        try:
            client.get_model(model)
        except errors.NotFound:
            client.create_model(model)
            say(f"created model {model}")
    if task is None and any(u.format == "gguf" for u in uploads):
        task = "generate"
    fields = {"notes": notes, "task": task, "pooling": pooling, "normalize": normalize, "max_length": max_length}
    version = client.create_version(model, **{k: v for k, v in fields.items() if v is not None})
    say(f"created draft version {version['label']} (id {version['id']})")
    for upload in uploads:
        artifact = _upload(client, version["id"], upload, retries)
        artifact = client.wait_artifact(artifact["id"])
        say(f"  {upload.describe()}: {artifact['size']:,} bytes, sha256 {artifact['sha256'][:16]}…, ready")
    version = client.publish_version(version["id"]) if publish else client.get_version(version["id"])
    if publish:
        say(f"published {version['label']}")
    show(version, VERSION_COLUMNS)


def _upload(client: Client, version_id: int, upload: push.Upload, retries: int) -> Json:
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(upload.path.name, total=upload.path.stat().st_size)
        return client.upload_artifact(
            version_id,
            upload.path,
            role=upload.role,
            precision=upload.precision,
            hardware_class=upload.hardware_class,
            format=upload.format,
            progress=lambda done, total: bar.update(task, completed=done),
            retries=retries,
        )


@versions.command("publish")
@click.argument("version")
@click.option("--wait", is_flag=True, help="First wait for the version's files to finish processing")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait with --wait")
@output_option
def versions_publish(version: str, wait: bool, timeout: float) -> None:
    """Publish a draft VERSION (id, model:number): it becomes immutable and deployable."""
    client = settings().client()
    if wait:
        for artifact in client.get_version(version)["artifacts"]:
            client.wait_artifact(artifact["id"], timeout=timeout)
    show(client.publish_version(version), VERSION_COLUMNS)


@versions.command("optimize")
@click.argument("version")
@click.option("--variant", "variants", multiple=True, type=click.Choice(["int8", "int4", "fp16", "repack"]),
              help="A variant to build (repeat; default all three: int8, int4, fp16, or for a generative "
                   "model's GGUF repack, int4, int8)")  # fmt: skip
@click.option("--wait", is_flag=True, help="Wait until the pipeline succeeds or fails (exit 1 if it fails)")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds to wait with --wait")
@output_option
def versions_optimize(version: str, variants: tuple[str, ...], wait: bool, timeout: float) -> None:
    """Build and evaluate variants of a draft VERSION: int8/int4/fp16 of its fp32 ONNX model, or the
    repack/int4/int8 bundles (with an fp32 reference) of a generative model's GGUF."""
    client = settings().client()
    pipeline = client.optimize_version(version, variants=list(variants) or None)
    say(f"pipeline {pipeline['id']} {pipeline['state']}")
    if wait:
        pipeline = client.wait_pipeline(pipeline["id"], timeout=timeout)
    columns = [("id", lambda p: p["id"]), ("state", lambda p: p["state"]), ("error", lambda p: p["error"]),
               ("steps", lambda p: ", ".join(f"{s['kind']} {s['state']}" for s in p["steps"]))]  # fmt: skip
    show(pipeline, columns)
    if wait and pipeline["state"] != "succeeded":
        raise errors.EdgefleetError(f"pipeline {pipeline['id']} is {pipeline['state']}: {pipeline['error']}")


# --- Aliases -------------------------------------------------------------------------


@cli.group()
def alias() -> None:
    """Movable names of versions (stable, canary)."""


ALIAS_COLUMNS = [("alias", lambda a: f"{a['model']}:{a['name']}"), ("version", lambda a: a["version_label"]),
                 ("updated", lambda a: a["updated_at"])]  # fmt: skip


@alias.command("set")
@click.argument("name")
@click.argument("version")
@click.option("--reason", default="")
@output_option
def alias_set(name: str, version: str, reason: str) -> None:
    """Point alias NAME of VERSION's model at VERSION: `edgefleet alias set stable minilm:3`."""
    client = settings().client()
    target = client.get_version(version)
    show(client.set_alias(target["model"], name, target["id"], reason=reason), ALIAS_COLUMNS)


@alias.command("list")
@click.argument("model")
@output_option
def alias_list(model: str) -> None:
    """A model's aliases and the versions they name."""
    show(settings().client().list_aliases(model), ALIAS_COLUMNS)


# --- Devices -------------------------------------------------------------------------


@cli.group()
def devices() -> None:
    """Devices of the fleet."""


DEVICE_COLUMNS = [
    ("device", lambda d: d["device_id"]),
    ("online", lambda d: d["online"]),
    ("tags", lambda d: ", ".join(d["tags"])),
    ("hardware", lambda d: d["hardware"]["hardware_class"]),
    ("runs", lambda d: d["current_version"] and d["current_version"]["label"]),
    ("deployment", lambda d: d["current_deployment"] and
        f"{d['current_deployment']['version']} {d['current_deployment']['state']}"),
    ("last seen", lambda d: d["last_seen"]),
]  # fmt: skip


@devices.command("list")
@click.option("--tag", help="Only devices carrying this tag")
@click.option("--online/--offline", default=None, help="Only online (or offline) devices")
@click.option("--hardware-class", type=click.Choice(list(spec.HARDWARE_CLASSES)))
@click.option("--model", help="Only devices running a version of this model")
@click.option("--limit", type=int, help="At most this many")
@output_option
def devices_list(tag: str | None, online: bool | None, hardware_class: str | None, model: str | None,
                 limit: int | None) -> None:  # fmt: skip
    """Devices of the fleet; a device's tags are plain names (`--tag lab`)."""
    found = (
        settings()
        .client()
        .list_devices(tag=tag, online=online, hardware_class=hardware_class, model=model, limit=limit)
    )
    show(found, DEVICE_COLUMNS)


@devices.command("show")
@click.argument("device_id")
@output_option
def devices_show(device_id: str) -> None:
    """One device: hardware, tags, what it runs and its current deployment."""
    show(settings().client().get_device(device_id))


# --- Rollouts ------------------------------------------------------------------------


@cli.group()
def rollouts() -> None:
    """Staged rollouts: apply a rollout file, watch it, steer it."""


ROLLOUT_COLUMNS = [
    ("id", lambda r: r["id"]),
    ("name", lambda r: r["name"]),
    ("version", lambda r: r["version_label"]),
    ("state", lambda r: r["state"]),
    ("stage", lambda r: f"{r['current_stage'] + 1}/{len(r['stages'])}"),
    ("reason", lambda r: r["reason"]),
]


@rollouts.command("list")
@click.option("--state", type=click.Choice(["draft", "running", "paused", "completed", "aborted", "rolled_back"]))
@click.option("--model")
@output_option
def rollouts_list(state: str | None, model: str | None) -> None:
    """Rollouts, newest first."""
    show(settings().client().list_rollouts(state=state, model=model), ROLLOUT_COLUMNS)


@rollouts.command("show")
@click.argument("rollout_id", type=int)
@output_option
def rollouts_show(rollout_id: int) -> None:
    """One rollout: version, state, current stage and reason."""
    show(settings().client().get_rollout(rollout_id), ROLLOUT_COLUMNS)


@rollouts.command("apply")
@click.option("-f", "--file", "path", required=True, type=click.File("r"), help="The rollout file (YAML); - for stdin")
@click.option("--start/--no-start", default=True, show_default=True, help="Start it once created")
@click.option("--supersede", is_flag=True, help="Abort running rollouts that hold some of the devices")
@click.option("--reason", default="", help="For the audit log")
@click.option("--watch", "then_watch", is_flag=True, help="Then watch it, with the exit codes of `rollouts watch`")
@click.option("--timeout", type=float, help="With --watch: give up after this many seconds (exit 4)")
@click.option("--hold-timeout", default=900.0, show_default=True, help="With --watch: exit 3 once held this long")
@click.option("--interval", default=2.0, show_default=True, help="With --watch: seconds between polls")
@output_option
def rollouts_apply(path: Any, start: bool, supersede: bool, reason: str, then_watch: bool, timeout: float | None,
                   hold_timeout: float, interval: float) -> None:  # fmt: skip
    """Create (and start) a rollout from a rollout file, checked whole before any call. See docs/cli.md."""
    source = getattr(path, "name", "rollout.yaml")
    rollout_spec = spec.load(path.read(), source=source)
    for warning in rollout_spec.warning_lines(source):
        err.print(f"warning: {warning}", highlight=False, markup=False)
    client = settings().client()
    body = dict(rollout_spec.body)
    if rollout_spec.version is not None:
        body["version"] = client.version_id(rollout_spec.version)
    try:
        rollout = client.create_rollout(body)
    except errors.ValidationFailed as exc:
        raise errors.EdgefleetError(f"the plane refused {source}: {_with_lines(exc, rollout_spec)}") from None
    say(f"created rollout {rollout['id']} of {rollout['version_label'] or body.get('alias')}")
    if start:
        rollout = client.start_rollout(rollout["id"], reason=reason, supersede=supersede)
        say(f"started rollout {rollout['id']}: {rollout['state']}")
    if not then_watch:
        show(rollout, ROLLOUT_COLUMNS)
        return
    _watch(client, rollout["id"], timeout=timeout, hold_timeout=hold_timeout, interval=interval)


def _with_lines(exc: errors.ApiError, rollout_spec: spec.RolloutSpec) -> str:
    """The plane's reasons, each stage's pointed at its line of the file."""
    body = exc.body if isinstance(exc.body, dict) else {}
    parts = []
    for key, value in body.items():
        if key == "stages" and isinstance(value, list | dict):
            parts += _stage_reasons(value, rollout_spec)
            continue
        line = rollout_spec.lines.get(key)
        text = errors.reason_of(value, key if key != "non_field_errors" else "")
        parts.append(f"line {line}: {text}" if line else text)
    return "; ".join(parts) or exc.reason


_STAGE_NAMED = re.compile(r"stage (\d+)\b")


def _stage_reasons(problems: list[Any] | dict[str, Any], rollout_spec: spec.RolloutSpec) -> list[str]:
    """The stages' reasons at their lines.

    A rule of the plane names its stage ("stage 2 (quarter): percent: ..."); a malformed
    stage comes back at its position from 0 (in a list or a mapping), with its own reasons.
    """
    parts = []
    for position, problem in problems.items() if isinstance(problems, dict) else enumerate(problems):
        if not problem:
            continue
        if isinstance(problem, str):
            named = _STAGE_NAMED.match(problem)
            index, text = (int(named.group(1)) - 1 if named else -1), problem
        else:
            index = int(position)
            text = f"stage {index + 1}: {errors.reason_of(problem)}"
        line = rollout_spec.stage_lines[index] if 0 <= index < len(rollout_spec.stage_lines) else None
        parts.append(f"line {line}: {text}" if line else f"stages: {text}")
    return parts


@rollouts.command("watch")
@click.argument("rollout_id", type=int)
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 4)")
@click.option("--hold-timeout", default=900.0, show_default=True,
              help="Exit 3 once a stage is held (soak over, a gate inconclusive or waiting, no device moving) "
                   "this long")  # fmt: skip
@click.option("--interval", default=2.0, show_default=True, help="Seconds between polls")
@output_option
def rollouts_watch(rollout_id: int, timeout: float | None, hold_timeout: float, interval: float) -> None:
    """Show a rollout's stages, gates and devices live until it ends.

    Exits 0 when it completes, 1 when it rolls back or is aborted, 3 when a stage is held past
    --hold-timeout, 4 at --timeout."""
    _watch(settings().client(), rollout_id, timeout=timeout, hold_timeout=hold_timeout, interval=interval)


def _watch(client: Client, rollout_id: int, *, timeout: float | None, hold_timeout: float, interval: float) -> None:
    watcher = watch.Watch(timeout=timeout, hold_timeout=hold_timeout)
    as_json = settings().json
    live = Live(console=out, auto_refresh=False) if out.is_terminal and not as_json else None
    last_line = ""
    verdict: watch.Verdict | None = None
    progress: Json = {}
    try:
        if live is not None:
            live.start()
        while verdict is None:
            try:
                progress = client.rollout_progress(rollout_id)
            except (errors.Unreachable, errors.ServerError) as exc:
                # A blip in the network is not the rollout's failure: keep trying, for a while.
                if watcher.give_up_on_errors():
                    raise
                say(f"(retrying) {exc}")
                time.sleep(interval)
                continue
            verdict = watcher.observe(progress)
            if live is not None:
                table = progress_table(progress)
                if watcher.held_since is not None:
                    held = watcher.clock() - watcher.held_since
                    table.caption = f"held {held:.0f} s (exit 3 at {hold_timeout:.0f} s)"
                live.update(table, refresh=True)
            elif not as_json:
                line = summary(progress)
                if line != last_line:
                    out.print(line, highlight=False, markup=False)
                    last_line = line
            if verdict is None:
                time.sleep(interval)
    finally:
        if live is not None:
            live.stop()
    if as_json:
        result = {"rollout": rollout_id, "outcome": verdict.outcome, "exit_code": verdict.code,
                  "message": verdict.message, "progress": progress}  # fmt: skip
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        (out if verdict.code == 0 else err).print(f"rollout {rollout_id}: {verdict.message}", highlight=False)
    sys.exit(verdict.code)


def summary(progress: Json) -> str:
    """One line per change, for logs (CI): state, then each stage's devices and gates."""
    stages = []
    for stage in progress["stages"]:
        c = stage["counts"]
        gates = " ".join(f"{g['gate']}={g['verdict']}" for g in stage["gates"])
        devices = f"{c['active']}/{c['targeted']} active" + (f", {c['failed']} failed" if c["failed"] else "")
        stages.append(f"[{stage['index'] + 1} {stage['name']} {stage['status']}: {devices}; {gates}]")
    held = " (held: soak over, a gate undecided)" if watch.holding_gates(progress) else ""
    return f"rollout {progress['id']} {progress['state']}{held} " + " ".join(stages)


def progress_table(progress: Json) -> Table:
    reason = f": {progress['reason']}" if progress.get("reason") else ""
    table = Table(title=f"rollout {progress['id']}: {progress['state']} (fleet {progress['fleet']}){reason}")
    for heading in ("stage", "status", "soak left", "devices", "gates"):
        table.add_column(heading)
    for stage in progress["stages"]:
        c = stage["counts"]
        devices = (f"{c['active']}/{c['targeted']} active, {c['downloading'] + c['verifying'] + c['pending']} moving, "
                   f"{c['failed']} failed, {c['rolled_back']} rolled back, {c['ineligible']} ineligible")  # fmt: skip
        gates = "\n".join(_gate(g) for g in stage["gates"])
        soak = stage["soak_remaining_s"]
        table.add_row(f"{stage['index'] + 1} {stage['name']} ({stage['size']})", stage["status"],
                      "—" if soak is None else f"{soak:.0f} s", devices, gates)  # fmt: skip
    return table


def _gate(gate: Json) -> str:
    colour = {"pass": "green", "fail": "red", "inconclusive": "yellow"}.get(gate["verdict"], "white")
    numbers = "" if gate["value"] is None else f" {gate['value']:g}"
    if gate["value"] is not None and gate["threshold"] is not None:
        numbers += f" vs {gate['threshold']:g}"
    return f"[{colour}]{gate['gate']} {gate['verdict']}[/]{numbers}: {gate['detail']}"


def _steer(action: str, help_text: str) -> None:
    @rollouts.command(action, help=help_text)
    @click.argument("rollout_id", type=int)
    @click.option("--reason", default="", help="For the audit log")
    @output_option
    def command(rollout_id: int, reason: str) -> None:
        client = settings().client()
        show(getattr(client, f"{action}_rollout")(rollout_id, reason=reason), ROLLOUT_COLUMNS)


_steer("promote", "Skip the rest of the current stage's soak; its gates must still pass.")
_steer("pause", "Hold everything: no assignments, no verdicts, no automatic rollback.")
_steer("resume", "Resume a paused rollout; it is evaluated at once.")
_steer("abort", "Stop for good; devices keep what they run (`rollback` undoes it).")
_steer("rollback", "Send every device the rollout reached back to the version it ran before.")


# --- Audit and enrollment tokens -------------------------------------------------------


@cli.command("audit")
@click.option("--action", help="e.g. rollout.start, version.publish")
@click.option("--object-type")
@click.option("--object-id")
@click.option("--since", help="ISO 8601 time")
@click.option("--limit", default=50, show_default=True)
@output_option
def audit(action: str | None, object_type: str | None, object_id: str | None, since: str | None, limit: int) -> None:
    """The audit log, newest first."""
    events = (
        settings()
        .client()
        .list_audit(action=action, object_type=object_type, object_id=object_id, since=since, limit=limit)
    )
    columns = [("when", lambda e: e["created_at"]), ("actor", lambda e: e["actor_label"]),
               ("action", lambda e: e["action"]), ("object", lambda e: e["object_repr"]),
               ("reason", lambda e: e["reason"])]  # fmt: skip
    show(events, columns)


@cli.group("enrollment-tokens")
def enrollment_tokens() -> None:
    """Tokens with which new devices ask to join the fleet."""


TOKEN_COLUMNS = [("id", lambda t: t["id"]), ("name", lambda t: t["name"]), ("prefix", lambda t: t["prefix"]),
                 ("expires", lambda t: t["expires_at"]), ("revoked", lambda t: t["revoked_at"]),
                 ("auto approve", lambda t: t["auto_approve"]), ("devices", lambda t: t["device_count"])]  # fmt: skip


@enrollment_tokens.command("list")
@output_option
def tokens_list() -> None:
    """Enrollment tokens (never their secrets)."""
    show(settings().client().list_enrollment_tokens(), TOKEN_COLUMNS)


@enrollment_tokens.command("create")
@click.argument("name")
@click.option("--expires-in-hours", default=24, show_default=True)
@click.option("--auto-approve", is_flag=True)
@click.option("--max-devices", type=int)
@output_option
def tokens_create(name: str, expires_in_hours: int, auto_approve: bool, max_devices: int | None) -> None:
    """A new token; its secret is shown this once."""
    token = (
        settings()
        .client()
        .create_enrollment_token(
            name, expires_in_hours=expires_in_hours, auto_approve=auto_approve, max_devices=max_devices
        )
    )
    show(token, [*TOKEN_COLUMNS, ("secret (shown once)", lambda t: t["token"])])


@enrollment_tokens.command("revoke")
@click.argument("token_id", type=int)
@output_option
def tokens_revoke(token_id: int) -> None:
    """Revoke a token: no new device may enroll with it."""
    show(settings().client().revoke_enrollment_token(token_id), TOKEN_COLUMNS)


# --- Entry point ---------------------------------------------------------------------


def main() -> None:
    cli(prog_name="edgefleet")
