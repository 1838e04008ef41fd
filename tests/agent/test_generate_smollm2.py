"""The real SmolLM2-135M bundle on onnxruntime-genai, served to the official openai client.

The int4 bundle comes from the model cache (~/.cache/edgefleet/models/smollm2-onnx/int4),
converted from the GGUF that make models fetches on first use. Skipped, with the reason,
when neither the bundle nor the GGUF and its converter are there.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from agent.config import GenerationConfig
from agent.contract import wire
from agent.core import Agent
from agent.generate import ChatMessage, LoadedGenerator, load_generator
from agent.runtime import Runner
from agent.selftest import SelfTestFailed, run_selftest
from agent.server import InferenceServer
from agent.telemetry import GenerationRecorder, LatencyRecorder
from tests.agent.fakes import FakeLink, FakePlane
from tests.agent.generators import INFO, SMOLLM2_BUNDLES, CountingEngine, smollm2_bundle
from tests.agent.helpers import desired, final_state, make_agent, send_desired, wait_for

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
SPEC = wire.InferenceSpec(task="generate")


@pytest.fixture(scope="session")
def bundle() -> Path:
    found = smollm2_bundle()
    if found is None:
        pytest.skip(
            f"no SmolLM2 bundle in {SMOLLM2_BUNDLES / 'int4'}, and no GGUF (make models) or GGUF converter "
            "(fleet/lib/gguf) to build it"
        )
    return found


@pytest.fixture(scope="module")
def smollm2(bundle: Path) -> LoadedGenerator:
    return load_generator(bundle, spec=SPEC, info=INFO, threads=GenerationConfig().thread_count())


@pytest.fixture
def engine(smollm2: LoadedGenerator) -> CountingEngine:
    return CountingEngine(smollm2.engine)


def serve(engine: CountingEngine, **generation: int) -> InferenceServer:
    runner = Runner()
    runner.install(LoadedGenerator(engine, SPEC, INFO))
    server = InferenceServer(
        runner, LatencyRecorder(), generations=GenerationRecorder(), port=0, generation=GenerationConfig(**generation)
    )
    server.start()
    return server


@pytest.fixture
def server(engine: CountingEngine) -> Iterator[InferenceServer]:
    server = serve(engine)
    yield server
    server.stop()


def client(server: InferenceServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=120)


def test_it_answers_paris_to_the_openai_client(server: InferenceServer) -> None:
    answer = client(server).chat.completions.create(model="tiny-lm", messages=FRANCE, temperature=0, max_tokens=24)  # type: ignore[arg-type]
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.usage is not None and answer.usage.completion_tokens <= 24


def test_it_streams_the_answer_to_the_openai_client(server: InferenceServer) -> None:
    stream = client(server).chat.completions.create(
        model="tiny-lm",
        messages=FRANCE,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=24,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "Paris" in "".join(pieces) and len(pieces) > 3


def test_it_stops_generating_when_the_streaming_client_disconnects(
    server: InferenceServer, engine: CountingEngine
) -> None:
    stream = client(server).chat.completions.create(
        model="tiny-lm",
        messages=STORY,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=1500,
        stream=True,
    )
    for index, _chunk in enumerate(stream):
        if index == 5:
            break
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: engine.running == 0, timeout=30, what="the generation to stop")
    stopped_at = engine.produced
    assert stopped_at < 100
    threading.Event().wait(0.5)
    assert engine.produced == stopped_at  # no token generated after it stopped


def test_it_answers_429_when_the_model_is_busy(engine: CountingEngine) -> None:
    server = serve(engine, max_running=1, max_waiting=0)
    try:
        stream = client(server).chat.completions.create(
            model="tiny-lm",
            messages=STORY,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=1500,
            stream=True,
        )
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as caught:
            client(server).chat.completions.create(model="tiny-lm", messages=FRANCE)  # type: ignore[arg-type]
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        stream.close()
    finally:
        server.stop()


def _rendered(model: LoadedGenerator, question: str) -> str:
    return model.engine.render_chat([ChatMessage("user", question)])


def test_it_passes_a_self_test_against_its_own_reference_and_refuses_a_diverging_one(smollm2: LoadedGenerator) -> None:
    prompt = _rendered(smollm2, "What is the capital of France?")
    reference = smollm2.greedy_ids(prompt, 16)
    run_selftest(smollm2, wire.SelfTest(prompts=[prompt], token_ids=[reference], min_token_agreement=1.0))
    diverging = [(t + 1) % 49152 for t in reference[:4]] + reference[4:]
    with pytest.raises(SelfTestFailed, match=f"{(len(reference) - 4) / len(reference):.1%} of positions"):
        run_selftest(smollm2, wire.SelfTest(prompts=[prompt], token_ids=[diverging], min_token_agreement=0.9))


# --- the agent: deploy the bundle over the (fake) broker, serve it, report it ------------------


def _bundle_files(plane: FakePlane, directory: Path) -> list[wire.FileManifest]:
    roles: dict[str, wire.FileRole] = {
        "model.onnx": "model",
        "model.onnx.data": "model_data",
        "genai_config.json": "config",
        "tokenizer.json": "tokenizer",
        "tokenizer_config.json": "tokenizer",
    }
    return [plane.add(directory / name, role, chunk_size=4 << 20) for name, role in roles.items()]


def _degraded_copy(bundle: Path, directory: Path) -> Path:
    """The bundle with every weight zeroed: it loads and generates, but nothing like the reference."""
    directory.mkdir()
    for source in bundle.iterdir():
        if source.name == "model.onnx.data":
            with (directory / source.name).open("wb") as zeros:
                zeros.truncate(source.stat().st_size)
        else:
            shutil.copyfile(source, directory / source.name)
    return directory


@pytest.fixture
def agent(tmp_path: Path, link: FakeLink) -> Iterator[Agent]:
    agent = make_agent(tmp_path / "data", link, generation=GenerationConfig(max_running=1))
    agent.start()
    yield agent
    agent.stop()


def test_it_deploys_serves_and_reports_a_generative_model_and_refuses_a_degraded_variant(
    agent: Agent, link: FakeLink, plane: FakePlane, smollm2: LoadedGenerator, bundle: Path, tmp_path: Path
) -> None:
    assert agent.server is not None
    prompt = _rendered(smollm2, "What is the capital of France?")
    reference = smollm2.greedy_ids(prompt, 16)  # the shipped variant's own tokens: what the plane evaluates against
    selftest = wire.SelfTest(prompts=[prompt], token_ids=[reference], min_token_agreement=0.9)
    send_desired(link, desired(1, _bundle_files(plane, bundle), model="smollm2", inference=SPEC, selftest=selftest))
    assert final_state(link, 1, timeout=120).state == "active"

    answer = client(agent.server).chat.completions.create(model="smollm2", messages=FRANCE, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (answer.choices[0].message.content or "")
    agent.send_heartbeat()
    beat = wait_for(lambda: [b for b in link.sent(wire.Channel.HEARTBEAT) if b.generation], what="a heartbeat")[-1]
    assert beat.generation.requests == 1 and beat.generation.tokens == answer.usage.completion_tokens  # type: ignore[union-attr]
    assert beat.generation.ttft_p50_ms > 0 and beat.generation.decode_tps_p50 > 0

    degraded = _degraded_copy(bundle, tmp_path / "degraded")
    send_desired(link, desired(2, _bundle_files(plane, degraded), model="smollm2", inference=SPEC, selftest=selftest))
    refused = final_state(link, 2, timeout=120)
    assert refused.state == "failed" and "self-test failed" in refused.error
    assert "agree with the reference on 0.0% of positions" in refused.error
    assert agent.active is not None and agent.active.deployment_id == 1
    again = client(agent.server).chat.completions.create(model="smollm2", messages=FRANCE, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (again.choices[0].message.content or "")


def test_it_serves_a_generative_model_again_after_a_restart(
    tmp_path: Path, link: FakeLink, plane: FakePlane, bundle: Path
) -> None:
    first = make_agent(tmp_path / "data", link)
    first.start()
    try:
        send_desired(link, desired(1, _bundle_files(plane, bundle), model="smollm2", inference=SPEC))
        assert final_state(link, 1, timeout=120).state == "active"
    finally:
        first.stop()
    again = make_agent(tmp_path / "data", FakeLink())  # no plane: the model comes from disk alone
    again.start()
    try:
        assert again.server is not None and again.active is not None and again.active.deployment_id == 1
        answer = client(again.server).chat.completions.create(model="smollm2", messages=FRANCE, temperature=0)  # type: ignore[arg-type]
        assert "Paris" in (answer.choices[0].message.content or "")
    finally:
        again.stop()
