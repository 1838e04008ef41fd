"""Broker confinement through Mosquitto's dynamic-security plugin.

The plane administers the broker over ``$CONTROL/dynamic-security/v1``: one login
and one role per device, whose ACLs name that device's own topics, so it is held
to ``fleet/<its id>/…``; one role for the bridge. docker/mosquitto/secure.conf
loads the plugin.

Mosquitto 2.0.11 does not substitute ``%u`` in publish ACLs (tested), so a role
shared by every device cannot confine them: each device's role spells its topics.

What a change costs: the plugin rewrites its whole file (about 1.5 KB a device) after
every command that changes something, whatever the number of commands in a message.
Measured here, a command took about 60 ms with 2,000 device logins and grows with the
fleet. So a device's login is made with two changes (its role created with its ACLs,
then its client), and a refresh changes only what differs (docs/security.md).
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any, Final

import paho.mqtt.client as mqtt

from agent.contract import wire
from fleet.errors import Unavailable

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"
DEVICE_ROLE_PREFIX: Final = "edgefleet-device-"
BRIDGE_ROLE: Final = "edgefleet-bridge"
# Device logins live in a namespace of their own: no device id can name the plane's login, the
# broker's admin or any other client the plane did not create for a device. ":" is not allowed
# in a device id (agent.contract.wire.DeviceId), so nothing outside the namespace starts this way by chance.
DEVICE_LOGIN_PREFIX: Final = "device:"
DEVICE_TEXTNAME: Final = "Edgefleet device {}"


def device_username(device_id: str) -> str:
    """The broker login of a device."""
    return DEVICE_LOGIN_PREFIX + device_id


def device_role(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + device_id


class DynSecError(Unavailable):
    """The broker refused a command; the text is the broker's reason."""

    def __str__(self) -> str:
        return (
            f"the broker did not take the change: {super().__str__()}. Try again; if it persists, check the "
            "broker and the plane's admin login (MQTT_ADMIN_URL)"
        )


class ForeignLogin(DynSecError):
    """A broker login of that name exists and was not created by the plane for that device."""


def _acl(acltype: str, topic: str, allow: bool = True, priority: int = 0) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}


def _acl_key(acl: dict[str, Any]) -> tuple[str, str, bool, int]:
    return (acl["acltype"], acl["topic"], bool(acl.get("allow", False)), int(acl.get("priority", 0)))


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """A device sends on its agent channels and hears its plane channels, nothing else."""
    acls = [_acl("publishClientSend", wire.topic(device_id, c)) for c in wire.AGENT_CHANNELS]
    acls += [_acl("subscribeLiteral", wire.topic(device_id, c)) for c in wire.PLANE_CHANNELS]
    acls += [_acl("publishClientReceive", wire.topic(device_id, c)) for c in wire.PLANE_CHANNELS]
    return acls


def device_login(device_id: str, password: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A device's role (with its ACLs) and its client, as the commands that create them."""
    role = {"command": "createRole", "rolename": device_role(device_id), "acls": device_acls(device_id)}
    client = {
        "command": "createClient",
        "username": device_username(device_id),
        "password": password,
        "textname": DEVICE_TEXTNAME.format(device_id),
        "roles": [{"rolename": device_role(device_id)}],
    }
    return role, client


def bridge_acls() -> list[dict[str, Any]]:
    """The plane hears every device's agent channels and sends on their plane channels."""
    acls = [_acl("subscribePattern", f) for f in wire.plane_subscriptions(shared=True)]
    acls += [_acl("subscribePattern", f) for f in wire.plane_subscriptions(shared=False)]
    acls += [_acl("publishClientReceive", f"{wire.TOPIC_ROOT}/+/{c}") for c in wire.AGENT_CHANNELS]
    acls += [_acl("publishClientSend", f"{wire.TOPIC_ROOT}/+/{c}") for c in wire.PLANE_CHANNELS]
    return acls


DEFAULT_ACCESS: Final = [
    {"acltype": "publishClientSend", "allow": False},
    {"acltype": "publishClientReceive", "allow": False},
    {"acltype": "subscribe", "allow": False},
    {"acltype": "unsubscribe", "allow": True},
]


class DynSec:
    """Sends dynamic-security commands and waits for the broker's answers.

    ``client`` is a paho client logged in as the broker's admin user and looping
    (``loop_start``); the caller owns its connection.
    """

    def __init__(self, client: mqtt.Client, *, timeout: float = 10.0) -> None:
        self.client = client
        self.timeout = timeout
        self._pending: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        client.message_callback_add(RESPONSE_TOPIC, self._on_response)
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_response(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        for response in responses:
            with self._lock:
                waiter = self._pending.get(response.get("correlationData", ""))
            if waiter is not None:
                waiter[1].append(response)
                waiter[0].set()

    def execute(self, command: str, *, ignore: tuple[str, ...] = (), **fields: Any) -> dict[str, Any]:
        """Run one command; raise DynSecError unless it succeeded or failed with an ``ignore``d reason."""
        correlation = uuid.uuid4().hex
        done: threading.Event = threading.Event()
        box: list[dict[str, Any]] = []
        with self._lock:
            self._pending[correlation] = (done, box)
        try:
            payload = json.dumps({"commands": [{"command": command, "correlationData": correlation, **fields}]})
            self.client.publish(CONTROL_TOPIC, payload, qos=1)
            if not done.wait(self.timeout):
                raise DynSecError(f"{command}: the broker did not answer in {self.timeout}s; is the plugin loaded?")
        finally:
            with self._lock:
                self._pending.pop(correlation, None)
        response = box[0]
        error = response.get("error")
        if error and error not in ignore:
            raise DynSecError(f"{command}: {error}")
        return response

    def ensure_roles(self) -> None:
        """Deny whatever no role allows, and create or refresh the bridge's role. Idempotent."""
        self.execute("setDefaultACLAccess", acls=DEFAULT_ACCESS)
        self._set_role(BRIDGE_ROLE, bridge_acls())

    def _set_role(self, role: str, acls: list[dict[str, Any]]) -> None:
        """Create the role with these ACLs, or bring an existing role's ACLs to exactly these.

        Each change rewrites the plugin's file (see the module's docstring): an existing role
        whose ACLs are already right costs one read and no change.
        """
        if not self.execute("createRole", rolename=role, acls=acls, ignore=("Role already exists",)).get("error"):
            return
        current = self.execute("getRole", rolename=role)["data"]["role"].get("acls", [])
        wanted, present = {_acl_key(acl) for acl in acls}, {_acl_key(acl) for acl in current}
        for acl in current:
            if _acl_key(acl) not in wanted:
                self.execute("removeRoleACL", rolename=role, acltype=acl["acltype"], topic=acl["topic"])
        for acl in acls:
            if _acl_key(acl) not in present:
                self.execute("addRoleACL", rolename=role, **acl)

    def add_device(self, device_id: str, password: str) -> None:
        """A broker login for a device, with a role of its own topics; fails if the login exists."""
        role, client = device_login(device_id, password)
        self._set_role(role["rolename"], role["acls"])
        self.execute(**client)

    def _device_login(self, username: str, device_id: str) -> dict[str, Any] | None:
        """The login, or None if there is none; raise DynSecError if it is not this device's own.

        The plane touches only a client it created for that very device: one whose only role
        is the device's role. Any other client of that name is left exactly as it is.
        """
        found = self.execute("getClient", username=username, ignore=("Client not found",))
        if found.get("error"):
            return None
        client: dict[str, Any] = found["data"]["client"]
        roles = [r.get("rolename") for r in client.get("roles", [])]
        if roles != [device_role(device_id)]:
            raise ForeignLogin(f"broker login {username!r} is not {device_id}'s (roles {roles}); it is left untouched")
        return client

    def set_device_password(self, device_id: str, password: str) -> None:
        """Create the device's login, or give the device's existing login a new password."""
        username = device_username(device_id)
        login = self._device_login(username, device_id)
        if login is None:
            self.add_device(device_id, password)
            return
        self._set_role(device_role(device_id), device_acls(device_id))
        self.execute("setClientPassword", username=username, password=password)
        if login.get("disabled"):
            self.execute("enableClient", username=username)

    def add_bridge(self, username: str, password: str) -> None:
        self.execute("createClient", username=username, password=password, roles=[{"rolename": BRIDGE_ROLE}])

    def set_bridge_login(self, username: str, password: str) -> None:
        """Create the plane's login with the bridge's role, or reset an existing one's password and role."""
        created = self.execute(
            "createClient",
            username=username,
            password=password,
            roles=[{"rolename": BRIDGE_ROLE}],
            ignore=("Client already exists",),
        )
        if created.get("error"):
            self.execute("setClientPassword", username=username, password=password)
            roles = self.execute("getClient", username=username)["data"]["client"].get("roles", [])
            # 2.0.11 answers "Internal error" to adding a role the client already has.
            if BRIDGE_ROLE not in [r["rolename"] for r in roles]:
                self.execute("addClientRole", username=username, rolename=BRIDGE_ROLE)
            self.execute("enableClient", username=username)

    def disable_device(self, device_id: str) -> None:
        """Refuse the device's login from now on; the broker disconnects it at once."""
        self.execute("disableClient", username=device_username(device_id))

    def remove_device(self, device_id: str) -> None:
        """Delete the device's login and role; the broker disconnects it at once.

        A login from before device logins had their namespace (named by the bare device id)
        goes too, but only if it is that device's own.
        """
        self.execute("deleteClient", username=device_username(device_id), ignore=("Client not found",))
        try:
            if self._device_login(device_id, device_id) is not None:
                self.execute("deleteClient", username=device_id)
        except ForeignLogin:
            pass
        self.execute("deleteRole", rolename=device_role(device_id), ignore=("Role not found",))
