"""Broker confinement through Mosquitto's dynamic-security plugin.

The plane administers the broker over ``$CONTROL/dynamic-security/v1``: one login
and one role per device, whose ACLs name that device's own topics, so it is held
to ``fleet/<its id>/…``; one role for the bridge. docker/mosquitto/secure.conf
loads the plugin.

Mosquitto 2.0.11 does not substitute ``%u`` in publish ACLs (tested), so a role
shared by every device cannot confine them: each device's role spells its topics.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any, Final

import paho.mqtt.client as mqtt

from agent import wire

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"
DEVICE_ROLE_PREFIX: Final = "edgefleet-device-"
BRIDGE_ROLE: Final = "edgefleet-bridge"


class DynSecError(Exception):
    """The broker refused a command; the text is the broker's reason."""


def _acl(acltype: str, topic: str, allow: bool = True, priority: int = 0) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """A device sends on its agent channels and hears its plane channels, nothing else."""
    acls = [_acl("publishClientSend", wire.topic(device_id, c)) for c in wire.AGENT_CHANNELS]
    acls += [_acl("subscribeLiteral", wire.topic(device_id, c)) for c in wire.PLANE_CHANNELS]
    acls += [_acl("publishClientReceive", wire.topic(device_id, c)) for c in wire.PLANE_CHANNELS]
    return acls


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
        self.execute("createRole", rolename=role, ignore=("Role already exists",))
        for acl in self.execute("getRole", rolename=role)["data"]["role"].get("acls", []):
            self.execute("removeRoleACL", rolename=role, acltype=acl["acltype"], topic=acl["topic"])
        for acl in acls:
            self.execute("addRoleACL", rolename=role, **acl)

    def add_device(self, device_id: str, password: str) -> None:
        """A broker login for a device (username = device id) with a role of its own topics."""
        role = DEVICE_ROLE_PREFIX + device_id
        self._set_role(role, device_acls(device_id))
        self.execute("createClient", username=device_id, password=password, roles=[{"rolename": role}])

    def set_device_password(self, device_id: str, password: str) -> None:
        """Create the device's login, or give the existing one a new password."""
        role = DEVICE_ROLE_PREFIX + device_id
        self._set_role(role, device_acls(device_id))
        created = self.execute(
            "createClient",
            username=device_id,
            password=password,
            roles=[{"rolename": role}],
            ignore=("Client already exists",),
        )
        if created.get("error"):
            self.execute("setClientPassword", username=device_id, password=password)
            self.execute("enableClient", username=device_id)

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
        self.execute("disableClient", username=device_id)

    def remove_device(self, device_id: str) -> None:
        """Delete the device's login and role; the broker disconnects it at once."""
        self.execute("deleteClient", username=device_id, ignore=("Client not found",))
        self.execute("deleteRole", rolename=DEVICE_ROLE_PREFIX + device_id, ignore=("Role not found",))
