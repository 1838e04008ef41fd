"""The generation loop, stop strings and the token-agreement self-test, on a fake engine."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.chat import parse_request
from agent.contract import wire
from agent.generate import ChatMessage, GenerateError, Sampling, StopMatcher
from agent.selftest import SelfTestFailed, run_selftest, token_agreement
from tests.agent.generators import EOS, PARIS, FakeEngine, fake_generator

GREEDY = Sampling(max_tokens=16, temperature=0.0)


def test_it_stops_at_end_of_sequence_and_says_stop() -> None:
    model = fake_generator()
    generation = model.start(model.prompt_ids([ChatMessage("user", "What is the capital of France?")]), GREEDY)
    assert "".join(generation) == " The capital of France is Paris."
    assert (generation.finish_reason, generation.completion_tokens) == ("stop", len(PARIS))
    assert generation.ttft_ms is not None and generation.decode_tps is not None


def test_it_stops_at_max_tokens_and_says_length() -> None:
    generation = fake_generator().start([1, 2], Sampling(max_tokens=3, temperature=0.0))
    assert "".join(generation) == " The capital of"
    assert (generation.finish_reason, generation.completion_tokens) == ("length", 3)


def test_it_caps_max_tokens_at_the_room_left_in_the_context() -> None:
    engine = FakeEngine([9] * 100, context_length=10)
    generation = fake_generator(engine).start([1] * 6, Sampling(max_tokens=50, temperature=0.0))
    list(generation)
    assert generation.completion_tokens == 4 and generation.finish_reason == "length"


def test_it_refuses_a_prompt_that_fills_the_context() -> None:
    with pytest.raises(GenerateError, match="context holds 8"):
        fake_generator(FakeEngine(context_length=8)).start([1] * 8, GREEDY)


def test_it_cuts_the_answer_at_a_stop_string_split_across_tokens() -> None:
    generation = fake_generator().start([1], GREEDY, stop=["is Par"])
    assert "".join(generation) == " The capital of France "
    assert generation.finish_reason == "stop"


def test_it_emits_held_back_text_that_turned_out_not_to_be_a_stop_string() -> None:
    matcher = StopMatcher(["Paris!"])
    assert matcher.feed(" is Pa") == (" is ", False)
    assert matcher.feed("ris.") == ("Paris.", False)
    assert matcher.flush() == ""


def test_it_releases_the_engine_when_the_caller_stops_reading() -> None:
    engine = FakeEngine([9] * 100)
    generation = fake_generator(engine).start([1], Sampling(max_tokens=100, temperature=0.0))
    pieces = iter(generation)
    next(pieces), next(pieces)
    assert engine.running == 1
    generation.close()
    assert engine.running == 0 and engine.produced == 2


def test_it_passes_a_self_test_whose_reference_tokens_it_reproduces() -> None:
    test = wire.SelfTest(prompts=["a b", "c"], token_ids=[PARIS[:4], PARIS[:6]], min_token_agreement=1.0)
    run_selftest(fake_generator(), test)


def test_it_refuses_a_model_whose_greedy_tokens_disagree_with_the_reference() -> None:
    degraded = fake_generator(FakeEngine([1, 2, 3, 9, 9, 9, 9, EOS]))
    test = wire.SelfTest(prompts=["q"], token_ids=[PARIS[:7]], min_token_agreement=0.9)
    assert token_agreement(degraded, test) == pytest.approx(3 / 7)
    with pytest.raises(SelfTestFailed, match="42.9% of positions, below the 90%"):
        run_selftest(degraded, test)


def test_it_compares_nothing_past_the_references_end_of_sequence() -> None:
    test = wire.SelfTest(prompts=["q"], token_ids=[[*PARIS, 5, 5, 5, 5]])  # an evaluator that ran on past EOS
    assert token_agreement(fake_generator(), test) == 1.0


def test_it_counts_a_short_answer_as_disagreement() -> None:
    short = fake_generator(FakeEngine([1, EOS]))
    test = wire.SelfTest(prompts=["q"], token_ids=[[1, 2, 3, 4]])
    assert token_agreement(short, test) == pytest.approx(1 / 4)


def test_it_smoke_tests_a_generator_without_prompts() -> None:
    engine = FakeEngine()
    run_selftest(fake_generator(engine), None)
    assert engine.produced > 0 and engine.samplings[0].greedy


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
chat_fields = st.fixed_dictionaries(
    {},
    optional={
        "messages": json_values | st.lists(st.fixed_dictionaries({"role": json_values, "content": json_values})),
        "max_tokens": json_values,
        "temperature": json_values,
        "top_p": json_values,
        "stop": json_values,
        "stream": json_values,
        "n": json_values,
        "seed": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(body=chat_fields | json_values)
def test_it_refuses_any_malformed_chat_request_with_a_clear_error(body: object) -> None:
    model = fake_generator(FakeEngine(context_length=1 << 20))
    try:
        request = parse_request(json.dumps(body).encode())
        model.start(model.prompt_ids(request.chat_messages()), request.sampling(16), request.stops())
    except GenerateError as exc:
        assert str(exc)
