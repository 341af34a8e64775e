"""Property-based fuzzing from the API's own OpenAPI document (schemathesis): no input gets a 5xx."""
from __future__ import annotations

import collections

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

EXAMPLES = 150  # generated cases per operation and mode (at most)


@pytest.fixture(scope="module")
def api_schema(tiny_settings, engines):
    """The schema the app serves at /openapi.json, bound to the app (called in-process through WSGI)."""
    from app import create_app

    app = create_app(tiny_settings.replace(max_tokens_limit=8), engines=engines.values())
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


def operations(schema) -> list:
    """Every operation of the schema."""
    return [result.ok() for result in schema.get_all_operations()]


def test_no_generated_request_gets_a_5xx(api_schema):
    """Valid and invalid bodies, paths and headers generated from the schema: answers are 2xx or 4xx, never 5xx."""
    statuses: collections.Counter = collections.Counter()
    for operation in operations(api_schema):
        for mode in ("positive", "negative"):
            strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                response = case.call()
                statuses[response.status_code] += 1
                case.validate_response(response, checks=[not_a_server_error])

            try:
                run()
            except Unsatisfiable:
                assert mode == "negative"  # an operation with no inputs has nothing to get wrong
    print(f"\nfuzz: {sum(statuses.values())} cases, responses by status: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 200 and 200 in statuses and 400 in statuses
    assert not any(status >= 500 for status in statuses)
