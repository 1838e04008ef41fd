"""Service errors as HTTP answers: a refused state change is a conflict, not a server error."""

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, status
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler

from fleet.mqtt.dynsec import DynSecError
from fleet.services.aliases import AliasError, AliasNotFound
from fleet.services.deployments import DeploymentError
from fleet.services.registry import ArtifactRejected, RegistryError
from fleet.services.retention import RetentionRefused
from fleet.services.rollouts import RolloutError
from fleet.storage import TooLarge

log = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The current state does not allow this change."
    default_code = "conflict"


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The upload is too large."
    default_code = "too_large"


class BrokerUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = (
        "The plane cannot administer the MQTT broker right now; try again in a minute. "
        "If it persists, the operator should check that the broker runs, that it loads the "
        "dynamic-security plugin, and MQTT_ADMIN_URL and MQTT_ADMIN_PASSWORD(_FILE)."
    )
    default_code = "broker_unavailable"
    retry_after = 60


def exception_handler(exc, context):
    if isinstance(exc, AliasNotFound):
        exc = exceptions.NotFound(str(exc))
    elif isinstance(exc, RegistryError | DeploymentError | RolloutError | AliasError | RetentionRefused):
        exc = Conflict(str(exc))
    elif isinstance(exc, TooLarge):
        exc = PayloadTooLarge(str(exc))
    elif isinstance(exc, ArtifactRejected):
        exc = exceptions.ValidationError({"file": [str(exc)]})
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(as_serializer_error(exc))
    elif isinstance(exc, DynSecError):
        # The broker's reason goes to the log, not to an anonymous caller.
        log.error("broker administration failed: %s", exc)
        exc = BrokerUnavailable()
    response = drf_exception_handler(exc, context)
    if isinstance(exc, BrokerUnavailable) and response is not None:
        # DRF sets Retry-After only for throttles.
        response["Retry-After"] = str(exc.retry_after)
    return response
