"""mqtts:// with a CA and client certificates, against a real Mosquitto TLS listener.

The test makes its own CA, a server certificate for 127.0.0.1 and client
certificates; the broker requires a client certificate signed by that CA.
"""

import datetime
import getpass
import ipaddress
import threading

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import TlsConfig
from agent.contract import wire
from agent.mqtt import MqttLink, Will
from fleet.mqtt.client import make_client
from tests.support import broker, wait_until


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(directory, name, *, issuer=None, ca=False, ip=None):
    """A key and certificate in PEM files; self-signed when there is no issuer."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer_key, signer_name = (issuer[0], issuer[1].subject) if issuer else (key, _name(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False)
    cert = builder.sign(signer_key, hashes.SHA256())
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, key_path, cert_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, _, ca_path = issue(directory, "ca", ca=True)
    files = {"ca": ca_path}
    for name, ip in (("server", "127.0.0.1"), ("dev-1", None), ("plane", None)):
        _, _, files[f"{name}.key"], files[f"{name}.pem"] = issue(directory, name, issuer=(ca_key, ca_cert), ip=ip)
    _, _, files["stranger.key"], files["stranger.pem"] = issue(directory, "stranger")  # not signed by the CA
    return files


@pytest.fixture(scope="module")
def tls_port(pki, tmp_path_factory):
    def config(port, directory):
        return (
            f"listener {port} 127.0.0.1\n"
            f"cafile {pki['ca']}\ncertfile {pki['server.pem']}\nkeyfile {pki['server.key']}\n"
            "require_certificate true\nallow_anonymous true\nset_tcp_nodelay true\n"
            f"user {getpass.getuser()}\n"
        )

    with broker(tmp_path_factory.mktemp("tls-broker"), config=config) as running:
        yield running.port


def agent_link(port, tls):
    goodbye = wire.encode(wire.Presence(device_id="dev-1", online=False, reason="lost"))
    return MqttLink(
        wire.parse_broker_url(f"mqtts://127.0.0.1:{port}"),
        client_id="edgefleet-agent-dev-1",
        will=Will(wire.topic("dev-1", wire.Channel.PRESENCE), goodbye),
        tls=tls,
    )


def test_it_carries_agent_messages_to_the_plane_over_tls(pki, tls_port, settings):
    settings.MQTT_CA_FILE, settings.MQTT_CERT_FILE, settings.MQTT_KEY_FILE = (
        str(pki["ca"]), str(pki["plane.pem"]), str(pki["plane.key"]),
    )  # fmt: skip
    plane = make_client("tls-test", broker=wire.parse_broker_url(f"mqtts://127.0.0.1:{tls_port}"))
    heard = threading.Event()
    plane.on_message = lambda client, userdata, message: heard.set()
    plane.connect("127.0.0.1", tls_port)
    plane.subscribe("fleet/+/heartbeat", qos=1)
    plane.loop_start()
    link = agent_link(tls_port, TlsConfig(ca_file=str(pki["ca"]), cert_file=str(pki["dev-1.pem"]),
                                          key_file=str(pki["dev-1.key"])))  # fmt: skip
    try:
        link.connect()
        assert link.wait_connected(10)
        wait_until(lambda: plane.is_connected(), timeout=10, what="the plane connected")
        link.publish("fleet/dev-1/heartbeat", b"{}")

        assert heard.wait(5)
    finally:
        link.close()
        plane.disconnect()
        plane.loop_stop()


@pytest.mark.parametrize(
    "tls",
    [
        pytest.param(lambda pki: TlsConfig(ca_file=str(pki["ca"])), id="no-client-certificate"),
        pytest.param(
            lambda pki: TlsConfig(
                ca_file=str(pki["ca"]), cert_file=str(pki["stranger.pem"]), key_file=str(pki["stranger.key"])
            ),  # fmt: skip
            id="certificate-from-another-ca",
        ),
        pytest.param(
            lambda pki: TlsConfig(cert_file=str(pki["dev-1.pem"]), key_file=str(pki["dev-1.key"])),
            id="broker-not-trusted",
        ),
    ],
)
def test_it_refuses_a_connection_the_ca_does_not_vouch_for(pki, tls_port, tls):
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    config = tls(pki)
    client.tls_set(ca_certs=config.ca_file or None, certfile=config.cert_file or None, keyfile=config.key_file or None)
    accepted = threading.Event()
    client.on_connect = lambda c, u, flags, reason, p: reason.is_failure or accepted.set()
    client.connect_async("127.0.0.1", tls_port)
    client.loop_start()
    try:
        # With TLS 1.3 the broker checks the client certificate after the client's handshake is done,
        # so the refusal is a dropped connection rather than an exception: assert no CONNACK ever comes.
        assert not accepted.wait(2)
    finally:
        client.loop_stop()
