"""The fan-out paths: desired messages built for many devices at once, state reports applied in batches."""

import time

import pytest

from agent.contract import wire
from agent.runtime import ModelInfo, load_model
from agent.selftest import run_selftest
from fleet.choices import ArtifactRole, DeploymentState, VariantQuality
from fleet.models import Artifact, AuditEvent, Deployment, Device, ModelVersion
from fleet.services import assignments, pipeline, registry, reports, rollouts
from fleet.services.desired import SELFTEST_TEXTS, desired_messages
from fleet.storage import get_store
from fleet.tasks import publish_desired
from tests.fleet.bert_fixtures import write_tiny_checkpoint
from tests.fleet.helpers import add_ready_artifact, make_device, make_model, make_published_version, make_version


def released(devices, name="embedder"):
    version = make_version(make_model(name))
    add_ready_artifact(version)
    version = registry.publish_version(version, actor="system")
    result = assignments.assign_version(version, devices, actor="system")
    return version, {d.device.device_id: d for d in result.deployments}


def report(device_id, deployment, state, **fields):
    message = wire.StateReport(device_id=device_id, deployment_id=deployment.pk, state=state, sent_at=1.0, **fields)
    return reports.ReceivedState(Device.objects.get(device_id=device_id).pk, device_id, message)


@pytest.mark.django_db
def test_it_applies_a_batch_of_reports_in_order_with_few_queries(django_assert_max_num_queries, fake_publisher):
    fleet = [make_device(f"dev-{n}") for n in range(20)]
    version, made = released(fleet)
    sha = version.artifacts.get(role=ArtifactRole.MODEL).sha256
    batch = []
    for device_id, deployment in made.items():
        batch.append(report(device_id, deployment, "downloading"))
        batch.append(report(device_id, deployment, "active", sha256=sha))
    batch.append(report("dev-0", made["dev-0"], "downloading"))  # back from active: refused
    batch.append(report("dev-1", made["dev-0"], "failed"))  # another device's deployment: refused

    with django_assert_max_num_queries(11):
        outcomes = reports.record_states(batch)

    assert [type(o).__name__ for o in outcomes[-2:]] == ["StaleReport", "StaleReport"]
    assert Deployment.objects.filter(version=version, state=DeploymentState.ACTIVE).count() == 20
    assert Device.objects.filter(current_version=version).count() == 20
    assert AuditEvent.objects.filter(action="deployment.downloading").count() == 20
    assert AuditEvent.objects.filter(action="deployment.active", actor_label="device:dev-3").count() == 1


@pytest.mark.django_db
def test_it_assigns_many_devices_with_a_fixed_number_of_queries(django_assert_max_num_queries, fake_publisher):
    few = [make_device(f"few-{n}") for n in range(2)]
    many = [make_device(f"many-{n}") for n in range(40)]
    version = make_version(make_model("embedder"))
    add_ready_artifact(version)
    version = registry.publish_version(version, actor="system")
    released(many, "before")  # what they replace is superseded in the same statement

    with django_assert_max_num_queries(12):
        assignments.assign_version(version, few, actor="system")
    with django_assert_max_num_queries(12):
        result = assignments.assign_version(version, many, actor="system")

    assert len(result.deployments) == 40
    assert Deployment.objects.filter(version=version, device__in=many, state=DeploymentState.PENDING).count() == 40
    assert not Deployment.objects.filter(device__in=many).exclude(version=version).exclude(state="superseded").exists()
    assert AuditEvent.objects.filter(action="deployment.assigned", object_repr__contains="many-").count() == 80


@pytest.mark.django_db
def test_it_supersedes_what_a_device_ran_when_a_batch_activates_its_new_deployment(fake_publisher):
    device = make_device("dev-1")
    old, made_old = released([device], "first")
    new, made_new = released([device], "second")
    reports.record_states([report("dev-1", made_old["dev-1"], "active")])  # superseded already: refused
    sha = new.artifacts.get(role=ArtifactRole.MODEL).sha256

    outcomes = reports.record_states([report("dev-1", made_new["dev-1"], "active", sha256=sha)])

    assert outcomes[0].state == DeploymentState.ACTIVE
    assert Device.objects.get(pk=device.pk).current_version == new


@pytest.mark.django_db
def test_it_builds_desired_messages_for_many_devices_with_a_fixed_number_of_queries(
    django_assert_max_num_queries, fake_publisher
):
    few = [make_device(f"few-{n}") for n in range(2)]
    many = [make_device(f"many-{n}") for n in range(40)]
    released(few + many)

    with django_assert_max_num_queries(4):
        publish_desired([d.pk for d in few])
    with django_assert_max_num_queries(4):
        publish_desired([d.pk for d in many])

    assert len(fake_publisher.messages) == 42


@pytest.fixture
def embedder(tmp_path, db, django_capture_on_commit_callbacks):
    """A tiny BERT imported and optimized to int8: a version with a real evaluation set."""
    from django.core.management import call_command

    call_command("import_hf_model", str(write_tiny_checkpoint(tmp_path / "tiny-bert")), model="tiny-bert")
    version = ModelVersion.objects.get(model__name="tiny-bert")
    with django_capture_on_commit_callbacks(execute=True):
        pipeline.start_pipeline(version, actor="system", variants=["int8"])
    Artifact.objects.filter(version=version, precision="int8").update(quality=VariantQuality.ACCEPTED)
    return registry.publish_version(version, actor="system")


@pytest.mark.django_db
def test_it_ships_a_selftest_the_device_passes_with_the_variant_it_gets(embedder, fake_publisher, tmp_path):
    device = make_device("dev-1")
    assignments.assign_version(embedder, [device], actor="system")

    (desired,) = desired_messages([device])

    assert desired.selftest is not None and 1 <= len(desired.selftest.texts) <= SELFTEST_TEXTS
    assert desired.selftest.min_cosine == pytest.approx(embedder.quality_threshold - 0.02)
    assert desired.providers == []
    assert len(wire.encode(desired)) < wire.MAX_MESSAGE_BYTES
    assert wire.decode(wire.Channel.DESIRED, wire.encode(desired)) == desired
    store = get_store()
    by_role = {f.role: Artifact.objects.get(sha256=f.sha256, version=embedder) for f in desired.files}
    assert by_role["model"].precision == "int8"
    loaded = load_model(
        store.path(by_role["model"].storage_key),
        spec=desired.inference,
        info=ModelInfo(deployment_id=desired.deployment_id, sha256=by_role["model"].sha256),
        tokenizer_path=store.path(by_role["tokenizer"].storage_key),
    )
    run_selftest(loaded, desired.selftest)  # raises SelfTestFailed if the device would refuse it


@pytest.mark.django_db
def test_it_ships_a_selftest_a_wrong_model_fails(embedder, fake_publisher):
    from agent.selftest import SelfTestFailed

    device = make_device("dev-1")
    assignments.assign_version(embedder, [device], actor="system")
    (desired,) = desired_messages([device])
    store = get_store()
    model = embedder.artifacts.get(precision="int8")
    tokenizer = embedder.artifacts.get(role=ArtifactRole.TOKENIZER)
    loaded = load_model(store.path(model.storage_key), spec=desired.inference,
                        info=ModelInfo(deployment_id=1, sha256=model.sha256),
                        tokenizer_path=store.path(tokenizer.storage_key))  # fmt: skip
    wrong = wire.SelfTest(
        texts=desired.selftest.texts,
        embeddings=[[-x for x in e] for e in desired.selftest.embeddings],
        min_cosine=desired.selftest.min_cosine,
    )

    with pytest.raises(SelfTestFailed):
        run_selftest(loaded, wrong)


@pytest.mark.django_db
def test_it_ships_no_selftest_for_a_version_without_an_evaluation_set(fake_publisher):
    device = make_device("dev-1")
    released([device])

    (desired,) = desired_messages([device])

    assert desired.selftest is None
    assert desired.issued_at <= time.time()


@pytest.mark.django_db
def test_it_names_a_rollout_once_for_a_flush_of_reports_on_its_members(fake_publisher):
    for n in range(5):
        make_device(f"dev-{n}", tags=["lab"])
    version = make_published_version()
    stage = {"percent": 100, "min_soak_seconds": 3600}
    rollout = rollouts.start_rollout(
        rollouts.create_rollout(version, stages=[stage], actor="system", tags=["lab"]), actor="system"
    )
    reported = list(Deployment.objects.filter(version=version).values_list("pk", flat=True))

    assert len(reported) == 5
    assert rollouts.rollout_ids_for_deployments(reported) == [rollout.pk]
