"""Which variant a device gets, from its profile alone."""

from fleet.lib.variants import Candidate, DeviceProfile, choose_variant

MB = 1_000_000
GB = 1 << 30
SAFE_INT8 = {"parameters": {"per_channel": True, "reduce_range": True}}
FULL_RANGE_INT8 = {"parameters": {"per_channel": True, "reduce_range": False}}


def family(int8_recipe=SAFE_INT8, hardware_class="any"):
    return [
        Candidate(1, "fp32", hardware_class, 90 * MB, peak_memory_bytes=150 * MB),
        Candidate(2, "int8", hardware_class, 23 * MB, peak_memory_bytes=50 * MB, recipe=int8_recipe),
        Candidate(3, "int4", hardware_class, 55 * MB, peak_memory_bytes=110 * MB),
        Candidate(4, "fp16", hardware_class, 45 * MB, peak_memory_bytes=180 * MB),
    ]


def x86(*flags, ram=8 * GB):
    return DeviceProfile("x86_64", "linux", "linux-x86_64", ram, ("CPUExecutionProvider",), frozenset(flags))


def precision(profile, candidates=None, **kwargs):
    chosen = choose_variant(profile, candidates if candidates is not None else family(), **kwargs)
    return chosen and chosen.precision


def test_it_gives_int8_to_x86_64_with_vnni():
    assert precision(x86("avx2", "avx512_vnni")) == "int8"
    assert precision(x86("avx2", "avx_vnni"), family(FULL_RANGE_INT8)) == "int8"


def test_it_gives_x86_64_without_vnni_only_a_reduced_range_int8():
    assert precision(x86("avx2")) == "int8"
    assert precision(x86("avx2"), family(FULL_RANGE_INT8)) == "int4"


def test_it_offers_an_uploaded_int8_whose_quantization_it_does_not_know():
    """No recipe: the uploader knows how it was built; refusing it left CPUs without VNNI with nothing."""
    assert precision(x86("avx2"), family({})) == "int8"
    assert precision(x86("avx2"), [Candidate(9, "int8", "any", 23 * MB)]) == "int8"


def test_it_gives_int8_to_aarch64_with_dotprod_and_int4_without():
    with_dotprod = DeviceProfile("aarch64", "linux", "linux-aarch64", 4 * GB, (), frozenset({"neon", "asimddp"}))
    without = DeviceProfile("aarch64", "linux", "linux-aarch64", 4 * GB, (), frozenset({"neon"}))

    assert precision(with_dotprod) == "int8"
    assert precision(without) == "int4"


def test_it_gives_fp16_to_apple_arm64_with_coreml_and_int8_without():
    coreml = DeviceProfile(
        "arm64", "darwin", "darwin-arm64", 16 * GB, ("CoreMLExecutionProvider", "CPUExecutionProvider")
    )
    cpu_only = DeviceProfile("arm64", "darwin", "darwin-arm64", 16 * GB, ("CPUExecutionProvider",))

    assert precision(coreml) == "fp16"
    assert precision(cpu_only) == "int8"


def test_it_gives_a_low_ram_device_what_fits_in_half_its_memory():
    low_ram = DeviceProfile("aarch64", "linux", "linux-aarch64", 200 * MB, (), frozenset({"neon"}))
    tiny = DeviceProfile("aarch64", "linux", "linux-aarch64", 64 * MB, (), frozenset({"neon"}))

    # It prefers int4 (110 MB), which is over its 100 MB budget: int8 (50 MB) fits.
    assert precision(low_ram) == "int8"
    # Nothing fits in 32 MB: the smallest, and the agent's admission check has the last word.
    assert precision(tiny) == "int8"


def test_it_prefers_a_variant_built_for_the_hardware_class():
    candidates = [*family(), Candidate(9, "fp32", "linux-x86_64", 90 * MB)]

    assert choose_variant(x86("avx512_vnni"), candidates).id == 9


def test_it_follows_a_pin_over_the_preference():
    assert choose_variant(x86("avx512_vnni"), family(), pinned=[4, 1]).precision == "fp16"
    # A pin on a variant that is not offered (rejected, say) is passed over.
    assert choose_variant(x86("avx512_vnni"), family(), pinned=[42]).precision == "int8"


def test_it_offers_nothing_without_candidates():
    assert choose_variant(x86(), []) is None


def test_it_drops_a_generative_variant_whose_measured_peak_rss_does_not_fit():
    # SmolLM2's bundles: the fp32 reference peaks near 700 MB, the 4-bit repack near 250 MB.
    gguf = {"tool": "fleet.lib.gguf.convert"}
    smollm2 = [
        Candidate(1, "fp32", "any", 650 * MB, peak_memory_bytes=700 * MB, recipe=gguf),
        Candidate(2, "int4", "any", 150 * MB, peak_memory_bytes=250 * MB, recipe=gguf),
    ]

    assert precision(x86("avx2", ram=GB), smollm2) == "int4"
    assert precision(x86("avx2", ram=2 * GB), [smollm2[0]]) == "fp32"
    # Nothing fits in 256 MB: the smallest peak is offered and the agent's admission refuses it.
    assert choose_variant(x86("avx2", ram=256 * MB), smollm2).id == 2


def test_it_gives_a_generative_model_its_smallest_measured_peak_not_its_preferred_precision():
    gguf = {"tool": "fleet.lib.gguf.convert"}
    smollm2 = [
        Candidate(2, "int4", "any", 150 * MB, peak_memory_bytes=263 * MB, recipe=gguf),
        Candidate(3, "int8", "any", 190 * MB, peak_memory_bytes=307 * MB, recipe=gguf),
    ]

    assert precision(x86("avx2", "avx512_vnni"), smollm2) == "int4"
