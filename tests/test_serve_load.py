"""Concurrent clients (retrieving and answering) against a live server while its index is updated, rolled
back and reloaded.

No request may fail, every response must agree with the version it reports (a passage added in version N
is found first in responses reporting N and absent from those reporting a version without it), and
once the clients stop, only the served version is left in memory.
"""

from __future__ import annotations

import gc
import threading
import time

import httpx
import pytest

from serve_data import LiveServer, add_passage, added_passage, build_data, copy_index, invoke, load_reader, serve_config

TOPICS = (14, 15, 16)
# What each version holds of the added passages: v0002 = v0001 + n14, v0003 = v0002 + n15, then a rollback
# to v0002, and v0004 = v0002 + n16.
HOLDS = {"v0001": set(), "v0002": {"n14"}, "v0003": {"n14", "n15"}, "v0004": {"n14", "n16"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("serve-load"))


def wait_for_version(url: str, name: str, responses: list, timeout: float = 15.0) -> None:
    """Until the server serves ``name`` and clients got answers from it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health").json()["version"] == name:
            seen = len(responses)
            while time.monotonic() < deadline:
                if sum(body["version"] == name for _, _, body in responses[seen:]) >= 6:
                    return
                time.sleep(0.02)
        time.sleep(0.05)
    raise AssertionError(f"the server did not answer from {name}")


def client_loop(url: str, stop: threading.Event, responses: list, failures: list, worker: int) -> None:
    """Ask for the added passages in a loop: worker 0 through /answer, the others through /retrieve."""
    with httpx.Client(base_url=url, timeout=30) as client:
        i = worker
        while not stop.is_set():
            topic = TOPICS[i % len(TOPICS)]
            retrieval = "answer" if worker == 0 else "hybrid" if i % 5 == 0 else "dense"
            i += 1
            question = added_passage(topic)["text"]
            try:
                if retrieval == "answer":
                    response = client.post("/answer", json={"question": question, "n_docs": 3})
                else:
                    response = client.post("/retrieve", json={"question": question, "k": 3, "retrieval": retrieval})
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text}")
            else:
                responses.append((topic, retrieval, response.json()))


@pytest.mark.slow
def test_no_request_fails_and_every_response_matches_its_version(data, tmp_path):
    index = copy_index(data, tmp_path / "index")
    cfg = serve_config(index, mine=str(data["mine"]), alpha="0.3", poll_seconds=0.1, max_batch=8, batch_window_ms=2)
    responses, failures = [], []
    stop = threading.Event()
    with LiveServer(cfg, load_reader(data, index)) as server:
        clients = [threading.Thread(target=client_loop, args=(server.url, stop, responses, failures, w)) for w in range(6)]
        for thread in clients:
            thread.start()
        try:
            time.sleep(0.3)
            add_passage(index, 14, tmp_path)  # v0002, found by polling `current`
            wait_for_version(server.url, "v0002", responses)
            add_passage(index, 15, tmp_path)  # v0003
            wait_for_version(server.url, "v0003", responses)
            invoke("index", "rollback", index)  # back to v0002, asked for at once
            assert httpx.post(f"{server.url}/admin/reload").json()["serving"] == "v0002"
            add_passage(index, 16, tmp_path)  # v0004, child of v0002
            wait_for_version(server.url, "v0004", responses)
            invoke("index", "rollback", index, "--to", "v0001")
            reload = httpx.post(f"{server.url}/admin/reload").json()
            assert reload["serving"] == "v0001" and reload.get("error") is None
            time.sleep(0.3)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=30)
        holder = server.holder
        deadline = time.monotonic() + 5
        while holder.live_versions != ["v0001"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder.live_versions == ["v0001"] and holder.in_flight == 0
        gc.collect()
        assert len(holder.opened) == len(holder.current.retrievers)  # older versions' retrievers are freed
        health = httpx.get(f"{server.url}/health").json()
        assert health["pending"] == 0 and health["live_versions"] == ["v0001"]

    assert failures == []
    seen = {body["version"] for _, _, body in responses}
    assert seen >= {"v0001", "v0002", "v0003", "v0004"}, seen
    for topic, retrieval, body in responses:
        ids = [p["id"] for p in body["passages"]]
        added = f"n{topic}"
        if added in HOLDS[body["version"]]:
            if retrieval in ("dense", "answer"):
                assert ids[0] == added, (body["version"], topic, ids)
        else:
            assert added not in ids, (body["version"], topic, ids)
    assert max(body["timings"]["batch_size"] for _, _, body in responses) > 1
    answered = [body for _, retrieval, body in responses if retrieval == "answer"]
    assert answered and all(isinstance(body["answer"], str) for body in answered)
