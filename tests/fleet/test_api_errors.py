"""Every domain error answers with its own status, through the one map (issue #17)."""

import inspect
from datetime import timedelta

import pytest

import fleet.bridge.chunks
import fleet.mqtt.dynsec
import fleet.services.aliases
import fleet.services.assignments
import fleet.services.enrollment
import fleet.services.pipeline
import fleet.services.registry
import fleet.services.reports
import fleet.services.retention
import fleet.services.rollouts
import fleet.services.stages
import fleet.storage
from fleet.api.exceptions import exception_handler
from fleet.errors import ServiceError
from fleet.models import Device
from fleet.services import enrollment
from tests.fleet.helpers import make_device, make_member, token_client
from tests.fleet.test_enrollment import Agent
from tests.support import free_port

MODULES = [
    fleet.bridge.chunks, fleet.mqtt.dynsec, fleet.services.aliases, fleet.services.assignments,
    fleet.services.enrollment, fleet.services.pipeline, fleet.services.registry, fleet.services.reports,
    fleet.services.retention, fleet.services.rollouts, fleet.services.stages, fleet.storage,
]  # fmt: skip
DOMAIN_ERRORS = sorted(
    {
        cls
        for module in MODULES
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, ServiceError)
    },
    key=lambda cls: cls.__qualname__,
)
EXPECTED = {
    "AliasNotFound": 404, "ArtifactRejected": 400, "EnrollmentError": 400, "NotAccepted": 403, "TooLarge": 413,
    "DynSecError": 503, "ForeignLogin": 503, "Unavailable": 503, "Invalid": 400, "Forbidden": 403, "NotFound": 404,
}  # fmt: skip


def test_it_knows_every_domain_error_of_the_services():
    names = {cls.__name__ for cls in DOMAIN_ERRORS}
    assert {"DeploymentError", "RolloutError", "RegistryError", "RetentionRefused", "EnrollmentError"} <= names
    assert {"AliasError", "StaleReport", "PipelineError", "DynSecError", "TooLarge"} <= names


@pytest.mark.parametrize("error", DOMAIN_ERRORS, ids=lambda cls: cls.__name__)
def test_it_answers_each_domain_error_with_its_status_and_its_text(error):
    response = exception_handler(error("the reason, and what to do"), {})

    assert response.status_code == EXPECTED.get(error.__name__, 409)
    if issubclass(error, fleet.mqtt.dynsec.DynSecError):
        # The broker's own reason goes to the log only; the caller is told what to check.
        assert "MQTT_ADMIN_URL" in str(response.data)
        assert response["Retry-After"]
    else:
        assert "the reason, and what to do" in str(response.data)


@pytest.mark.django_db
def test_it_answers_400_to_accepting_a_device_that_is_accepted_already():
    make_device("dev-1")

    response = token_client(make_member("olivia", "operator")).post("/api/v1/devices/dev-1/accept/")

    assert response.status_code == 400
    assert "accepted" in response.json()["detail"]


@pytest.mark.django_db
def test_it_answers_503_with_what_to_do_when_the_broker_cannot_be_reached(settings):
    settings.MQTT_DYNSEC = True
    settings.MQTT_ADMIN_URL = f"mqtt://admin@127.0.0.1:{free_port()}"  # nothing listens there
    _, secret = enrollment.create_token(name="t", expires_in=timedelta(hours=1), actor="system", auto_approve=True)
    agent = Agent("dev-9")
    agent.enroll(secret)

    response = agent.credentials()

    assert response.status_code == 503
    assert "MQTT_ADMIN_URL" in response.json()["detail"]
    assert Device.objects.get(device_id="dev-9").enrollment == "accepted"
