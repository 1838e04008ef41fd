import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.contract import manifest


@given(size=st.integers(0, 10**12), chunk_size=st.integers(1, 10**8))
def test_it_covers_every_byte_exactly_once(size, chunk_size):
    count = manifest.chunk_count(size, chunk_size)

    assert count * chunk_size >= size > (count - 1) * chunk_size or size == count == 0
    if count:
        last_offset, last_length = manifest.chunk_span(count - 1, size, chunk_size)
        assert last_offset + last_length == size
        assert 0 < last_length <= chunk_size


@given(data=st.binary(max_size=5000), chunk_size=st.integers(1024, 2048))
def test_it_builds_a_manifest_that_verifies_its_own_chunks(tmp_path_factory, data, chunk_size):
    path = tmp_path_factory.mktemp("m") / "f.bin"
    path.write_bytes(data)

    built = manifest.build_manifest(path, role="model", chunk_size=chunk_size)

    manifest.check_manifest(built)
    assert built.sha256 == hashlib.sha256(data).hexdigest() == manifest.file_sha256(path)
    assert built.size == len(data)
    for index in range(len(built.chunks)):
        offset, length = manifest.chunk_span(index, built.size, chunk_size)
        assert manifest.chunk_ok(built, index, data[offset : offset + length])


def test_it_rejects_a_chunk_with_one_byte_flipped(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 20)
    built = manifest.build_manifest(path, role="model", chunk_size=1024)
    good = path.read_bytes()[1024:2048]

    assert manifest.chunk_ok(built, 1, good)
    assert not manifest.chunk_ok(built, 1, bytes([good[0] ^ 1]) + good[1:])
    assert not manifest.chunk_ok(built, 1, good[:-1])


def test_it_has_no_chunks_for_an_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")

    built = manifest.build_manifest(path, role="tokenizer")

    assert built.chunks == [] and built.size == 0


def test_it_refuses_a_manifest_whose_chunk_list_does_not_fit_its_size(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 3000)
    built = manifest.build_manifest(path, role="model", chunk_size=1024)
    built.chunks.pop()

    with pytest.raises(ValueError, match="lists 2 chunks"):
        manifest.check_manifest(built)


@pytest.mark.parametrize("index", [-1, 3])
def test_it_refuses_a_chunk_outside_the_file(index):
    with pytest.raises(IndexError):
        manifest.chunk_span(index, 3000, 1024)


@given(data=st.binary(min_size=1, max_size=5000), cuts=st.lists(st.integers(1, 4999), max_size=8))
def test_it_cuts_a_manifest_where_it_is_told(tmp_path_factory, data, cuts):
    path = tmp_path_factory.mktemp("m") / "f.bin"
    path.write_bytes(data)
    points = sorted({c for c in cuts if c < len(data)})
    lengths = [b - a for a, b in zip([0, *points], [*points, len(data)], strict=True)]

    built = manifest.build_manifest(path, role="model", chunk_size=1024, lengths=lengths)

    manifest.check_manifest(built)
    assert built.lengths == lengths and built.sha256 == hashlib.sha256(data).hexdigest()
    spans = manifest.spans(built)
    assert b"".join(data[o : o + n] for o, n in spans) == data
    for index, (offset, length) in enumerate(spans):
        assert manifest.chunk_length(built, index) == length
        assert manifest.chunk_ok(built, index, data[offset : offset + length])


def test_it_refuses_lengths_that_do_not_cover_the_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 3000)
    with pytest.raises(ValueError, match="goes on after"):
        manifest.build_manifest(path, role="model", lengths=[1000, 1000])
    with pytest.raises(ValueError, match="ends inside"):
        manifest.build_manifest(path, role="model", lengths=[1000, 2001])

    built = manifest.build_manifest(path, role="model", lengths=[1000, 2000])
    built.lengths[1] = 1999
    with pytest.raises(ValueError, match="add up to 2999 bytes"):
        manifest.check_manifest(built)
    built.lengths.pop()
    with pytest.raises(ValueError, match="but 1 chunk lengths"):
        manifest.check_manifest(built)


def test_the_signed_form_names_the_lengths_only_of_a_content_defined_manifest(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 3000)
    fixed = manifest.build_manifest(path, role="model", chunk_size=1024)
    cut = manifest.build_manifest(path, role="model", chunk_size=1024, lengths=[1000, 2000])

    assert b'"lengths"' not in manifest.canonical_manifest(fixed, model="m", version="1")
    assert b'"lengths":[1000,2000]' in manifest.canonical_manifest(cut, model="m", version="1")
