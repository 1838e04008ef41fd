"""A login the benchmark writes into the plugin's file is the one the plane makes over the control topic."""

import pytest

from bench import logins
from fleet.mqtt.dynsec import DynSec, device_role, device_username
from tests.fleet.test_broker_confinement import Client
from tests.support import DYNSEC_PLUGIN

pytestmark = pytest.mark.skipif(not DYNSEC_PLUGIN.exists(), reason=f"{DYNSEC_PLUGIN} is not installed")


def _login(dynsec, device_id):
    client = dynsec.execute("getClient", username=device_username(device_id))["data"]["client"]
    acls = dynsec.execute("getRole", rolename=device_role(device_id))["data"]["role"]["acls"]
    named = {key: str(value).replace(device_id, "<id>") for key, value in client.items() if key != "username"}
    return named, sorted(str(acl).replace(device_id, "<id>") for acl in acls)


def test_a_login_in_the_plugin_file_is_the_one_the_plane_makes_over_the_control_topic(tmp_path):
    with logins.secure_broker(tmp_path, {"dev-file": "file-secret"}) as broker:
        admin = Client(broker.port, logins.ADMIN_LOGIN, broker.admin_password)
        try:
            dynsec = DynSec(admin.paho)
            dynsec.add_device("dev-live", "live-secret")

            assert _login(dynsec, "dev-file") == _login(dynsec, "dev-live")
            right = Client(broker.port, device_username("dev-file"), "file-secret")
            wrong = Client(broker.port, device_username("dev-file"), "live-secret")
            right.close(), wrong.close()
            assert right.accepted and not wrong.accepted
        finally:
            admin.close()
