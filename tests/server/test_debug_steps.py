"""GET /debug/steps: behind the API key like every route that touches the engine, and its
query parameters checked into the project's error body naming the parameter."""
from __future__ import annotations

import pytest
import requests

from tests.server.conftest import AUTH


def test_debug_steps_needs_the_api_key(auth_server) -> None:
    url = f"{auth_server.base_url}/debug/steps"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = requests.get(url, params={"reset": "1"}, headers=headers, timeout=10)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "AuthenticationError"
    ok = requests.get(url, params={"raw": "2"}, headers=AUTH, timeout=10)
    assert ok.status_code == 200 and "steps" in ok.json() and isinstance(ok.json()["raw"], list), ok.text


@pytest.mark.parametrize("query,param", [({"raw": "abc"}, "raw"), ({"raw": "-1"}, "raw"), ({"raw": "1.5"}, "raw"),
                                         ({"reset": "maybe"}, "reset")])
def test_debug_steps_bad_query_names_the_parameter(auth_server, query, param) -> None:
    response = requests.get(f"{auth_server.base_url}/debug/steps", params=query, headers=AUTH, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "BadRequestError" and error["code"] == 400
    assert error["message"].startswith(f"{param}: ")
