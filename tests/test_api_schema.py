"""Schema-driven fuzzing of the web API (schemathesis): requests generated from the OpenAPI schema, a bounded number
per operation (a slow test: CI runs it in its second step), never a 5xx and every answer documented (status code,
content type, body)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # about 10 s of generated requests; CI runs it in its second step
schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, settings  # noqa: E402

from boneage.serve import create_app  # noqa: E402
from tests.helpers import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(make_tiny_model(tmp_path_factory.mktemp("api") / "model"), max_upload_bytes=200_000)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_answers_every_generated_request_as_documented(case):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    # the file field is any bytes to the schema; bytes that are no image are rightly refused (400/415), so the checks
    # are: no 5xx, and every status and content type the API answers with is in its schema
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance])
