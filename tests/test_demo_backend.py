"""The demo backend: `keyproxy demo` is only convincing if the backend behind it is real.

It must refuse anything but its one secret (that is the problem keyproxy
solves) and serve every route of the example configuration, so the example config works
against it unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from keyproxy.commands.demo_backend import STORE, create_app, start_backend

SECRET = "demo-backend-secret"
AUTH = {"X-API-Key": SECRET}

Client = TestClient[Any, Any]


@pytest.fixture
async def client(aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(create_app(SECRET))


async def _json(response: aiohttp.ClientResponse, status: int) -> Any:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": ""},
        {"X-API-Key": SECRET[:-1]},
        {"Authorization": f"Bearer {SECRET}"},
    ],
)
async def test_anything_but_the_secret_is_refused(client: Client, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/data/posts"), ("DELETE", "/v1/data/posts/1"), ("GET", "/x")]:
        body = await _json(await client.request(method, path, headers=headers), 401)
        assert body["error"] == "unauthorized" and body["message"]


async def test_a_repeated_secret_is_refused(client: Client) -> None:
    headers = [("X-API-Key", SECRET), ("X-API-Key", SECRET)]
    await _json(await client.get("/v1/data/posts", headers=headers), 401)


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        create_app("")


async def test_list_limit_and_filters(client: Client) -> None:
    posts = await _json(await client.get("/v1/data/posts", headers=AUTH), 200)
    assert len(posts) == 3
    assert {"id", "title", "body", "createdBy", "author"} <= posts[0].keys()
    assert {"name", "phone"} == posts[0]["author"].keys()
    assert len(await _json(await client.get("/v1/data/posts?limit=1", headers=AUTH), 200)) == 1
    mine = await _json(await client.get("/v1/data/posts?createdBy=alice", headers=AUTH), 200)
    assert {p["createdBy"] for p in mine} == {"alice"} and len(mine) == 2
    users = await _json(await client.get("/v1/data/users", headers=AUTH), 200)
    assert all("@" in u["email"] for u in users)
    assert await _json(await client.get("/v1/data/audit_log", headers=AUTH), 200)
    await _json(await client.get("/v1/data/posts?limit=x", headers=AUTH), 400)
    await _json(await client.get("/v1/data/nope", headers=AUTH), 404)


async def test_create_read_update_delete(client: Client) -> None:
    doc = {"title": "New", "body": "text", "createdBy": "bob"}
    response = await client.post("/v1/data/comments", json=doc, headers=AUTH)
    created = await _json(response, 201)
    assert created == {**doc, "id": 3}
    assert response.headers["Location"] == "/v1/data/comments/3"

    read = await _json(await client.get("/v1/data/comments/3", headers=AUTH), 200)
    assert read == created

    patch = {"title": "Edited", "id": 99}
    updated = await _json(await client.patch("/v1/data/comments/3", json=patch, headers=AUTH), 200)
    assert updated["title"] == "Edited" and updated["id"] == 3

    response = await client.delete("/v1/data/comments/3", headers=AUTH)
    assert response.status == 204
    await _json(await client.get("/v1/data/comments/3", headers=AUTH), 404)
    await _json(await client.delete("/v1/data/comments/3", headers=AUTH), 404)


async def test_bad_bodies_are_json_errors(client: Client) -> None:
    for body in (b"{", b"[1, 2]"):
        response = await client.post("/v1/data/posts", data=body, headers=AUTH)
        assert (await _json(response, 400))["error"] == "bad_json"
    await _json(await client.patch("/v1/data/posts/42", json={}, headers=AUTH), 404)


async def test_search(client: Client) -> None:
    hits = await _json(
        await client.post("/posts/_search", json={"query": "ALICE"}, headers=AUTH), 200
    )
    assert {p["id"] for p in hits} == {1, 3}  # nested author.name counts
    assert (
        await _json(await client.post("/posts/_search", json={"query": "zzz"}, headers=AUTH), 200)
        == []
    )
    await _json(await client.post("/posts/_search", json={"query": 1}, headers=AUTH), 400)
    await _json(await client.post("/nope/_search", json={"query": ""}, headers=AUTH), 404)


async def test_bulk_is_all_or_nothing(client: Client) -> None:
    lines = [
        {"table": "posts", "doc": {"title": "Bulk 1", "createdBy": "carol"}},
        {"table": "metrics", "doc": {"cpu": 0.5}},
    ]
    ndjson = "\n".join(json.dumps(line) for line in lines) + "\n"
    result = await _json(await client.post("/_bulk", data=ndjson, headers=AUTH), 200)
    assert result == {
        "created": [{"table": "posts", "id": 4}, {"table": "metrics", "id": 1}],
        "errors": False,
    }
    assert len(await _json(await client.get("/v1/data/metrics", headers=AUTH), 200)) == 1

    bad = json.dumps(lines[0]) + "\n" + json.dumps({"table": "posts"}) + "\n"
    error = await _json(await client.post("/_bulk", data=bad, headers=AUTH), 400)
    assert "line 2" in error["message"]
    assert len(await _json(await client.get("/v1/data/posts", headers=AUTH), 200)) == 4


async def test_stream_is_chunked_ndjson(client: Client) -> None:
    response = await client.get("/_stream/posts", headers=AUTH)
    assert response.status == 200
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert response.content_type == "application/x-ndjson"
    lines = (await response.read()).splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1, 2, 3]


async def test_settings(client: Client) -> None:
    current = await _json(await client.get("/posts/_settings", headers=AUTH), 200)
    assert current["posts"]["settings"]["number_of_replicas"] == 1
    change = {"number_of_replicas": 2}
    await _json(await client.put("/posts/_settings", json=change, headers=AUTH), 200)
    current = await _json(await client.get("/posts/_settings", headers=AUTH), 200)
    assert current["posts"]["settings"]["number_of_replicas"] == 2


async def test_unknown_paths_and_methods_are_json_errors(client: Client) -> None:
    assert (await _json(await client.get("/nowhere", headers=AUTH), 404))["error"] == "not_found"
    response = await client.put("/v1/data/posts/1", json={}, headers=AUTH)
    assert (await _json(response, 405))["error"] == "method_not_allowed"
    assert "PATCH" in response.headers["Allow"]


async def test_each_app_has_its_own_data(client: Client) -> None:
    await client.delete("/v1/data/posts/1", headers=AUTH)
    assert len(create_app(SECRET)[STORE].tables["posts"]) == 3


async def test_start_backend_serves_on_a_real_port() -> None:
    runner, port = await start_backend(SECRET)
    try:
        assert port > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/v1/data/users/1", headers=AUTH) as response,
        ):
            assert response.status == 200
            assert (await response.json())["email"] == "alice@example.com"
    finally:
        await runner.cleanup()
