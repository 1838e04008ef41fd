"""A fuzz run of the REST API from its own OpenAPI schema: no input gives a server error.

schemathesis generates requests, valid and invalid, for every operation the schema
lists; they go to a live server with an admin's token, and only 5xx answers fail.
(Its lazy pytest loader does not run under pytest 9, so the test walks the
operations itself.)
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.fleet.helpers import make_device, make_published_version, make_version, token_client

# About 30 operations: a few examples each keeps the run under a minute.
FUZZ = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.django_db(transaction=True)
def test_it_never_answers_a_server_error(live_server, admin_user):
    # Something to find: random ids mostly miss, these let some requests reach the services.
    make_version(make_published_version("embedder").model)
    make_device("dev-1", tags=["lab"])
    headers = {"Authorization": token_client(admin_user)._credentials["HTTP_AUTHORIZATION"]}
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/schema/")
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]

    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy())
        def call(case):
            case.call_and_validate(base_url=live_server.url, headers=headers, checks=[not_a_server_error])

        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - schemathesis raises exception groups; report them all
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures[operation.label] = str(exc)[:2000]

    assert len(operations) >= 25
    assert failures == {}
