"""The published OpenAPI document is truthful: schemathesis generates requests from ``/openapi.json``
of a live loopback server on the tiny fixture, and every answer must be a documented status with a
documented content type and a body that fits the documented schema - and never a 5xx."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from serving_helpers import RunningServer, free_port, png_data_url  # noqa: E402

EXAMPLES = 40  # per operation: the whole file stays well under a minute and a half on 2 CPU cores
OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"),
              ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics")]


def valid_cases(operation, method: str, path: str) -> list:
    """Requests that must succeed, so that the 200 bodies (JSON and event streams) are checked too."""
    if method == "GET":
        return [operation.Case()]
    image = png_data_url(0, size=(24, 24))
    if path == "/v1/chat/completions":
        content = [{"type": "image_url", "image_url": {"url": image, "detail": "auto"}}, {"type": "text", "text": "What is shown?"}]
        body = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": content}], "max_tokens": 3}
        return [operation.Case(body=body, media_type="application/json"),
                operation.Case(body=body | {"stream": True}, media_type="application/json"),
                operation.Case(body=body | {"stream": True, "stream_options": {"include_usage": True}, "stop": "\n"},
                               media_type="application/json")]
    body = {"prompt": "A frontal chest radiograph.", "size": "16x16", "steps": 2, "n": 2}
    if path == "/v1/images/generations":
        return [operation.Case(body=body, media_type="application/json"), operation.Case(body={"prompt": "x", "size": "auto"},
                                                                                         media_type="application/json")]
    import base64

    png = base64.b64decode(image.split(",", 1)[1])
    return [operation.Case(body=body | {"image": image}, media_type="application/json"),
            operation.Case(body={"prompt": "Brighter.", "steps": 2, "image": [png]}, media_type="multipart/form-data")]


@pytest.fixture(scope="module")
def server(pipe):
    from unimedvl.serving import ServeConfig, create_app

    config = ServeConfig(max_new_tokens=4, max_steps=2, max_image_side=32, min_image_side=16, max_images_generated=2,
                         max_image_pixels=128 * 128, max_body_bytes=200_000, request_timeout_s=60, ui=False)
    running = RunningServer(create_app(pipe, config), free_port())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def document(server) -> dict:
    return httpx.get(server.url + "/openapi.json").json()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_every_route_documents_its_bodies_and_errors(document):
    paths = document["paths"]
    assert {(m.upper(), p) for p, ops in paths.items() for m in ops} == set(OPERATIONS)
    schemas = document["components"]["schemas"]

    def resolve(schema):
        return schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    for path, ops in paths.items():
        for method, op in ops.items():
            responses = op["responses"]
            assert "200" in responses and "500" in responses, (method, path)
            for code, response in responses.items():
                if code != "200":
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), (path, code)
            if method != "post":
                continue
            body = op["requestBody"]["content"]
            assert "application/json" in body and resolve(body["application/json"]["schema"])["properties"]
            ok = responses["200"]["content"]["application/json"]["schema"]
            assert resolve(ok)["properties"], (path, ok)
            assert {"400", "401", "404", "413", "429", "504"} <= set(responses)
    edits = paths["/v1/images/edits"]["post"]["requestBody"]["content"]
    form = resolve(edits["multipart/form-data"]["schema"])
    assert {"image", "prompt", "mask"} <= set(form["properties"]) and "image" in form["required"]
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in chat
    assert "ChatCompletionChunk" in str(chat["text/event-stream"]["schema"])
    assert resolve({"$ref": "#/components/schemas/ChatCompletionChunk"})["properties"]["usage"]
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is True


RUNS = [(m, p, mode) for m, p in OPERATIONS for mode in (("positive", "negative") if m == "POST" else ("positive",))]


@pytest.mark.parametrize("method, path, mode", RUNS, ids=[f"{m} {p} {mode}" for m, p, mode in RUNS])
def test_answers_conform_to_the_document(api_schema, server, method, path, mode):
    """Positive: requests the document allows; negative: requests it forbids (wrong types, missing
    fields) - both answered with documented statuses and bodies, never a 5xx."""
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

    operation = api_schema[path][method]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    seen: dict[int, int] = {}
    t0 = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE))
    def check(case):
        response = case.call_and_validate(base_url=server.url, checks=checks, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    for case in valid_cases(operation, method, path) if mode == "positive" else ():  # answers that succeed (generated bodies mostly do not)
        response = case.call_and_validate(base_url=server.url, checks=checks, timeout=60)
        assert response.status_code == 200, response.text
    check()
    assert seen and time.monotonic() - t0 < 60, (seen, time.monotonic() - t0)
    assert not any(code >= 500 for code in seen), seen
    if method == "GET":
        assert set(seen) == {200}, seen
    if mode == "negative" and path != "/v1/images/edits":  # a multipart mutation may be valid once sent as text
        assert set(seen) <= {400, 403, 404, 413}, seen  # refused as the client's fault


def test_a_stream_that_breaks_its_schema_would_be_caught(api_schema, server):
    """The event-stream schema is live: a chunk of the wrong kind fails schemathesis's schema check."""
    from schemathesis.core.transport import Response
    from schemathesis.specs.openapi.checks import response_schema_conformance

    case = api_schema["/v1/chat/completions"]["POST"].Case(body={"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                                                 "max_tokens": 2}, media_type="application/json")
    real = case.call(base_url=server.url, timeout=60)
    case.validate_response(real, checks=[response_schema_conformance])
    broken = Response(status_code=200, headers={"content-type": ["text/event-stream"]}, request=real.request, elapsed=0.1, verify=True,
                      content=b'data: {"id": "x", "object": "nope", "created": 1, "model": "m", "choices": []}\n\ndata: [DONE]\n\n')
    with pytest.raises(BaseException) as failure:
        case.validate_response(broken, checks=[response_schema_conformance])
    assert "schema" in str(failure.value).lower()


def test_a_local_file_refused_in_a_chat_is_a_documented_403(document, server):
    """A chat's image URL naming a file outside --allow-files is refused with 403, which the chat
    route documents (as the edit route does) - schemathesis found the undocumented answer."""
    content = [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}, {"type": "text", "text": "What is this?"}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]}, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "file_not_allowed"
    for path in ("/v1/chat/completions", "/v1/images/edits"):
        assert "403" in document["paths"][path]["post"]["responses"], path
