import time

import msgspec
import pytest

from agent.contract import wire


def hello(device_id="dev-1", **hardware):
    profile = {"arch": "aarch64", "os": "linux", "cpu_count": 4, "ram_bytes": 4 << 30, "providers": ["CPU"]}
    return wire.Hello(device_id=device_id, hardware=wire.HardwareProfile(**(profile | hardware)), sent_at=time.time())


class TestTopics:
    def test_it_names_every_topic_under_the_device(self):
        assert wire.topic("dev-1", wire.Channel.CHUNK_REQUEST) == "fleet/dev-1/chunks/req"
        assert wire.parse_topic("fleet/dev-1/chunks/data") == ("dev-1", wire.Channel.CHUNK_DATA)

    @pytest.mark.parametrize("name", ["fleet/dev-1", "fleet//hello", "other/dev-1/hello", "fleet/dev-1/nope", ""])
    def test_it_refuses_topics_outside_the_contract(self, name):
        with pytest.raises(wire.WireError):
            wire.parse_topic(name)

    def test_it_subscribes_the_plane_through_shared_subscriptions(self):
        subscriptions = wire.plane_subscriptions()

        assert "$share/edgefleet-plane/fleet/+/heartbeat" in subscriptions
        assert len(subscriptions) == len(wire.AGENT_CHANNELS)
        assert "fleet/+/hello" in wire.plane_subscriptions(shared=False)

    def test_it_keeps_plane_and_agent_channels_apart(self):
        assert not set(wire.AGENT_CHANNELS) & set(wire.PLANE_CHANNELS)


class TestMessages:
    def test_it_round_trips_every_message_with_its_schema_version(self):
        message = hello()

        decoded = wire.decode(wire.Channel.HELLO, wire.encode(message))

        assert decoded == message
        assert msgspec.json.decode(wire.encode(message))["v"] == wire.SCHEMA_VERSION

    def test_it_refuses_an_unknown_schema_version(self):
        payload = wire.encode(wire.Presence(device_id="dev-1", online=True, v=2))

        with pytest.raises(wire.WireError, match="schema version 2"):
            wire.decode(wire.Channel.PRESENCE, payload)

    def test_it_ignores_unknown_fields_so_senders_can_grow(self):
        payload = b'{"v": 1, "device_id": "dev-1", "online": true, "battery": 80}'

        assert wire.decode(wire.Channel.PRESENCE, payload).online is True

    @pytest.mark.parametrize(
        "payload, complaint",
        [
            (b"{", "bad presence message"),
            (b'{"v": 1, "online": true}', "device_id"),
            (b'{"v": 1, "device_id": "dev/1", "online": true}', "device_id"),
            (b'{"v": 1, "device_id": "+", "online": true}', "device_id"),
            (b'{"v": 1, "device_id": "dev-1", "online": "yes"}', "online"),
        ],
    )
    def test_it_says_what_is_wrong_with_a_bad_message(self, payload, complaint):
        with pytest.raises(wire.WireError, match=complaint):
            wire.decode(wire.Channel.PRESENCE, payload)

    def test_it_refuses_an_oversized_payload_unread(self):
        with pytest.raises(wire.WireError, match="limit"):
            wire.decode(wire.Channel.HEARTBEAT, b" " * (wire.MAX_MESSAGE_BYTES + 1))

    def test_it_refuses_a_payload_that_speaks_for_another_device(self):
        with pytest.raises(wire.WireError, match="claims device 'dev-2'"):
            wire.decode_from("fleet/dev-1/hello", wire.encode(hello("dev-2")))

    def test_it_refuses_a_negative_count(self):
        with pytest.raises(wire.WireError, match=r"\$.seq"):
            wire.decode(wire.Channel.HEARTBEAT, b'{"v":1,"device_id":"d","seq":-1}')

    def test_it_caps_the_chunks_of_one_request(self):
        request = wire.ChunkRequest(
            device_id="d", deployment_id=1, sha256="a" * 64, indexes=list(range(wire.MAX_CHUNKS_PER_REQUEST + 1))
        )

        with pytest.raises(wire.WireError, match="indexes"):
            wire.decode(wire.Channel.CHUNK_REQUEST, wire.encode(request))

    def test_it_refuses_a_state_outside_the_contract(self):
        payload = b'{"v":1,"device_id":"d","deployment_id":1,"state":"exploded","sent_at":1}'

        with pytest.raises(wire.WireError, match="state"):
            wire.decode(wire.Channel.STATE, payload)

    def test_it_says_nothing_is_desired_with_a_null_deployment(self):
        payload = wire.encode(wire.Desired(device_id="d", deployment_id=None, issued_at=1.0))

        desired = wire.decode(wire.Channel.DESIRED, payload)

        assert desired.deployment_id is None and desired.files == []


class TestIssue5Additions:
    """Optional fields added for the agent on the edge: old payloads decode with their defaults."""

    def test_it_decodes_a_desired_from_before_providers_and_selftest(self):
        payload = b'{"v": 1, "device_id": "dev-1", "deployment_id": 4, "issued_at": 1.0}'

        desired = wire.decode(wire.Channel.DESIRED, payload)

        assert (desired.providers, desired.selftest) == ([], None)

    def test_it_decodes_a_heartbeat_from_before_dropped(self):
        payload = (
            b'{"v": 1, "device_id": "dev-1", "seq": 1, "sent_at": 1.0, "interval_s": 30, "uptime_s": 1,'
            b' "cpu_percent": 0, "mem_rss_bytes": 1, "mem_available_bytes": 1}'
        )

        assert wire.decode(wire.Channel.HEARTBEAT, payload).dropped == 0

    def test_it_round_trips_a_selftest_with_its_tolerances(self):
        selftest = wire.SelfTest(
            texts=["a man"], embeddings=[[0.6, 0.8]], inputs=[{"x": [[1.0]]}], outputs=[{"y": [[2.0]]}], min_cosine=0.98
        )
        desired = wire.Desired(
            device_id="dev-1", deployment_id=4, issued_at=1.0, providers=["CPUExecutionProvider"], selftest=selftest
        )

        assert wire.decode(wire.Channel.DESIRED, wire.encode(desired)) == desired

    def test_it_refuses_a_cosine_outside_minus_one_to_one(self):
        payload = b'{"v": 1, "device_id": "dev-1", "deployment_id": 4, "issued_at": 1, "selftest": {"min_cosine": 2}}'

        with pytest.raises(wire.WireError, match="min_cosine"):
            wire.decode(wire.Channel.DESIRED, payload)


class TestChunkFrames:
    def test_it_round_trips_a_data_frame(self):
        frame = wire.encode_chunk("ab" * 32, 7, b"\x00\x01payload")

        chunk = wire.decode_chunk(frame)

        assert chunk == wire.Chunk(wire.ChunkKind.DATA, "ab" * 32, 7, b"\x00\x01payload")
        assert len(frame) == wire.CHUNK_HEADER_BYTES + 9

    def test_it_carries_an_error_reason(self):
        chunk = wire.decode_chunk(wire.encode_chunk("cd" * 32, 0, b"no such file", wire.ChunkKind.ERROR))

        assert chunk.kind == wire.ChunkKind.ERROR and chunk.data == b"no such file"

    @pytest.mark.parametrize(
        "frame, complaint",
        [
            (b"EFC", "shorter than its header"),
            (b"XYZ" + bytes(38), "magic"),
            (b"EFC\x09" + bytes(37), "version 9"),
            (b"EFC\x01\x07" + bytes(36), "kind 7"),
        ],
    )
    def test_it_refuses_a_broken_frame(self, frame, complaint):
        with pytest.raises(wire.WireError, match=complaint):
            wire.decode_chunk(frame)


class TestBrokerUrl:
    def test_it_reads_credentials_port_and_protocol(self):
        url = wire.parse_broker_url("mqtts://plane:s%40cret@broker.example:8884?protocol=3.1.1")

        assert url == wire.BrokerUrl(
            host="broker.example", port=8884, tls=True, username="plane", password="s@cret", protocol="3.1.1"
        )
        assert not url.mqtt_v5

    def test_it_defaults_to_mqtt_v5_on_the_standard_ports(self):
        assert wire.parse_broker_url("mqtt://localhost").port == 1883
        assert wire.parse_broker_url("mqtts://localhost").port == 8883
        assert wire.parse_broker_url("mqtt://localhost").mqtt_v5

    @pytest.mark.parametrize(
        "url", ["http://localhost", "mqtt://", "mqtt://host:port", "mqtt://host?protocol=4", "localhost:1883"]
    )
    def test_it_refuses_a_bad_url(self, url):
        with pytest.raises(wire.WireError):
            wire.parse_broker_url(url)
