"""`ragkit serve`: routes against direct retrieval, request limits, refused versions, reference counting,
micro-batching, client disconnects, the page's API calls and the command line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from indexing_data import corpus
from ragkit.cli import app as cli
from ragkit.config import ServeConfig
from ragkit.errors import RagkitError
from ragkit.indexing.fingerprint import weights_hash
from ragkit.indexing.retrieval import PassageRetriever
from ragkit.indexing.versions import set_current
from ragkit.serving.app import create_app, open_holder
from ragkit.serving.batcher import Busy, Job, MicroBatcher
from serve_data import LiveServer, add_passage, build_data, copy_index, invoke, load_reader, serve_config

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [q["question"] for q in corpus()[1]["dev"]]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(data):
    cfg = serve_config(data["index"], mine=str(data["mine"]), alpha="0.3")
    with TestClient(create_app(cfg, open_holder(cfg)), client=("127.0.0.1", 50000)) as test_client:
        yield test_client


# --- routes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_retrieve_returns_what_the_passage_retriever_finds(data, client, mode):
    direct = PassageRetriever.open(data["index"], mode=mode, mine=data["mine"], alpha=0.3, device="cpu", precision="fp32")
    for question in QUESTIONS:
        response = client.post("/retrieve", json={"question": question, "k": 4, "retrieval": mode})
        assert response.status_code == 200, response.text
        body = response.json()
        expected = direct.retrieve([question], k=4)[0]
        assert [p["id"] for p in body["passages"]] == expected.passage_ids
        assert [p["text"] for p in body["passages"]] == expected.texts
        assert [p["title"] for p in body["passages"]] == expected.titles
        np.testing.assert_allclose([p["score"] for p in body["passages"]], expected.scores, rtol=1e-4, atol=1e-5)
        assert body["version"] == "v0001" and body["retrieval"] == mode
        assert set(body["timings"]) == {"queue_ms", "compute_ms", "total_ms", "batch_size"}
        assert body["timings"]["total_ms"] >= body["timings"]["compute_ms"] > 0


def test_health_and_version_report_the_served_version_and_fingerprints(data, client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["version"] == "v0001" and health["live_versions"] == ["v0001"]
    info = client.get("/version").json()
    built = json.loads((data["index"] / "versions" / "v0001" / "version.json").read_text())["encoder"]
    assert info["version"] == "v0001" and info["passages"] == 42
    assert info["encoder"]["query_fingerprint"] == built["query_fingerprint"]
    assert info["encoder"]["passage_fingerprint"] == built["passage_fingerprint"]
    assert info["query_encoder"]["query_fingerprint"] == built["query_fingerprint"]
    assert info["retrieval"] == ["dense", "bm25", "hybrid"] and info["generator"] is None


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/retrieve", {}, 422, "question: Field required"),
        ("/retrieve", {"question": ""}, 422, "question: String should have at least 1 character"),
        ("/retrieve", {"question": "   "}, 422, "question: Value error, the question is blank"),
        ("/retrieve", {"question": "x" * 1001}, 422, "question: String should have at most 1000 characters"),
        ("/retrieve", {"question": 3}, 422, "question: Input should be a valid string"),
        ("/retrieve", {"question": "which", "k": "5"}, 422, "k: Input should be a valid integer"),
        ("/retrieve", {"question": "which", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ("/retrieve", {"question": "which", "k": 10000}, 422, "k: Input should be less than or equal to 50"),
        ("/retrieve", {"question": "which", "k": 45}, 400, "asked for 45 passages, index version v0001 holds 42"),
        ("/retrieve", {"question": "which", "retrieval": "splade"}, 422, "retrieval: Input should be 'dense', 'bm25' or 'hybrid'"),
        ("/retrieve", {"question": "which", "top": 3}, 422, "top: Extra inputs are not permitted"),
        ("/retrieve", ["which"], 422, "Input should be a valid dictionary"),
        ("/answer", {"question": "which", "n_docs": 0}, 422, "n_docs: Input should be greater than or equal to 1"),
        ("/answer", {"question": "which", "n_docs": 10000}, 422, "n_docs: Input should be less than or equal to 50"),
        ("/answer", {"n_docs": 3}, 422, "question: Field required"),
        ("/answer", {"question": "which", "decoding": 7}, 422, "decoding: Input should be 'greedy', 'beam', 'thorough' or 'fast'"),
        ("/answer", {"question": "which", "decoding": "sample"}, 422, "decoding: Input should be 'greedy', 'beam', 'thorough' or 'fast'"),
        ("/answer", {"question": "which"}, 503, "no reader loaded"),
        ("/admin/reload", {"version": "../etc"}, 422, "version: String should match pattern"),
    ],
)
def test_bad_requests_are_4xx_json_with_a_message(client, path, body, status, message):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_oversized_and_malformed_bodies_are_refused(client):
    big = json.dumps({"question": "which " * 200_000}).encode()  # about 1 MB
    response = client.post("/retrieve", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over 65536 bytes" in response.json()["error"]

    def chunks():  # no Content-Length: the bytes are counted as they arrive
        for _ in range(20):
            yield b"x" * 10_000

    response = client.post("/retrieve", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over 65536 bytes" in response.json()["error"]
    response = client.post("/retrieve", content=b'{"question": ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]
    assert client.post("/retrieve", json={"question": "which"}).status_code == 200


def test_reload_is_for_loopback_clients_only(data):
    cfg = serve_config(data["index"])
    with TestClient(create_app(cfg, open_holder(cfg)), client=("10.1.2.3", 4000)) as remote:
        response = remote.post("/admin/reload")
        assert response.status_code == 403 and "loopback" in response.json()["error"]
        assert remote.post("/retrieve", json={"question": "which"}).status_code == 200


def test_unserved_retrieval_mode_is_refused(data):
    cfg = serve_config(data["index"])  # no --mine: dense only
    with TestClient(create_app(cfg, open_holder(cfg))) as dense_only:
        response = dense_only.post("/retrieve", json={"question": "which", "retrieval": "bm25"})
        assert response.status_code == 400 and "start the server with --mine" in response.json()["error"]


@pytest.fixture(scope="module")
def answering(data):
    reader = load_reader(data)
    cfg = serve_config(data["index"])
    with TestClient(create_app(cfg, open_holder(cfg, reader), reader)) as test_client:
        yield reader, test_client


@pytest.mark.parametrize("decoding", ["greedy", "thorough"])
def test_answer_is_the_readers_own(data, answering, decoding):
    reader, answer_client = answering
    retriever = reader.retriever(data["index"])
    for question in QUESTIONS[:3]:
        response = answer_client.post("/answer", json={"question": question, "n_docs": 3, "decoding": decoding})
        assert response.status_code == 200, response.text
        body = response.json()
        expected = reader.answer([question], retriever, 3, decoding)[0]
        assert body["answer"] == expected.answer and body["decoding"] == decoding and body["version"] == "v0001"
        assert body["log_prob"] == pytest.approx(expected.log_prob, rel=1e-4, abs=1e-4)
        assert [p["id"] for p in body["passages"]] == [p["id"] for p in expected.passages]
        np.testing.assert_allclose([p["doc_score"] for p in body["passages"]], [p["doc_score"] for p in expected.passages],
                                   rtol=1e-4, atol=1e-5)
        assert set(body["timings"]) == {"queue_ms", "compute_ms", "total_ms", "batch_size"}


def test_answers_report_the_generator_and_refuse_what_the_version_cannot_meet(data, answering):
    reader, answer_client = answering
    info = answer_client.get("/version").json()
    assert info["generator"]["fingerprint"] == weights_hash(data["llama"])
    assert info["generator"]["kind"] == "causal" and info["generator"]["default_decoding"] == reader.default_decoding
    response = answer_client.post("/answer", json={"question": QUESTIONS[0], "n_docs": 43})
    assert response.status_code == 400 and "asked for 43 passages, index version v0001 holds 42" in response.json()["error"]
    response = answer_client.post("/answer", json={"question": QUESTIONS[0]})
    assert response.status_code == 200 and response.json()["decoding"] == reader.default_decoding


def test_a_batch_mixing_retrievals_and_answers_answers_each_alone(data):
    reader = load_reader(data)
    requests = [("retrieve", {"question": q, "k": k}) for q, k in zip(QUESTIONS, (1, 4, 2))]
    requests += [("answer", {"question": q, "n_docs": n, "decoding": d})
                 for q, n, d in zip(QUESTIONS, (2, 3, 2), ("greedy", "greedy", "fast"))]
    with LiveServer(serve_config(data["index"], batch_window_ms=300), reader) as server:
        with ThreadPoolExecutor(len(requests)) as pool:
            bodies = list(pool.map(lambda r: httpx.post(f"{server.url}/{r[0]}", json=r[1], timeout=60).json(), requests))
    assert max(body["timings"]["batch_size"] for body in bodies) > 1
    retriever = PassageRetriever.open(data["index"], device="cpu", precision="fp32")
    for (kind, request), body in zip(requests, bodies):
        if kind == "retrieve":
            expected = retriever.retrieve([request["question"]], k=request["k"])[0].passage_ids
            assert [p["id"] for p in body["passages"]] == expected
        else:
            alone = reader.answer([request["question"]], reader.retriever(data["index"]), request["n_docs"],
                                  request["decoding"])[0]
            assert body["answer"] == alone.answer and len(body["passages"]) == request["n_docs"]


# --- versions ----------------------------------------------------------------------------------------


def copy_version(index: Path, source: Path, name: str) -> Path:
    """``source`` (a version directory, maybe of another index) copied in as version ``name``."""
    target = index / "versions" / name
    shutil.copytree(source, target)
    info = json.loads((target / "version.json").read_text())
    info["version"] = name
    (target / "version.json").write_text(json.dumps(info))
    return target


def test_broken_versions_are_refused_and_the_old_one_keeps_serving(data, tmp_path, caplog):
    index = copy_index(data, tmp_path / "index")
    invoke("index", "build", data["ingest"], "--model", data["other"], "--out", tmp_path / "other", "--device", "cpu")
    invoke("index", "build", data["ingest"], "--model", data["wide"], "--out", tmp_path / "wide", "--device", "cpu")
    truncated = copy_version(index, index / "versions" / "v0001", "v0002")
    faiss_file = truncated / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[: faiss_file.stat().st_size // 2])
    copy_version(index, tmp_path / "other" / "versions" / "v0001", "v0003")
    copy_version(index, tmp_path / "wide" / "versions" / "v0001", "v0004")
    short = copy_version(index, index / "versions" / "v0001", "v0005")
    ids_file = short / "segments" / "0000" / "ids.txt"
    ids_file.write_text("".join(ids_file.read_text().splitlines(keepends=True)[:-1]))
    reasons = {"v0002": "unreadable FAISS index", "v0003": "was built by another encoder",
               "v0004": "holds 48-dimensional vectors, the model", "v0005": "41 ids, 42 vectors and 42 live flags disagree"}

    cfg = serve_config(index)
    holder = open_holder(cfg)
    with TestClient(create_app(cfg, holder), client=("127.0.0.1", 50000)) as local:
        before = local.post("/retrieve", json={"question": QUESTIONS[0], "k": 3}).json()
        for name, reason in reasons.items():
            set_current(index, name)
            response = local.post("/admin/reload")
            assert response.status_code == 409, response.text
            body = response.json()
            assert body["serving"] == "v0001" and reason in body["error"] and f"version {name} refused" in body["error"]
            after = local.post("/retrieve", json={"question": QUESTIONS[0], "k": 3}).json()
            assert after["version"] == "v0001" and after["passages"] == before["passages"]
            assert reason in caplog.text
        assert set(local.get("/health").json()["refused"]) == set(reasons)
        assert holder.poll() is None  # the pointer has not moved since: a refused version is not retried
        assert holder.live_versions == ["v0001"]
        set_current(index, "v0001")
        add_passage(index, 14, tmp_path)  # a good version after the broken ones is served
        result = holder.poll()
        assert result is not None and result.changed and result.version == "v0006"
        assert local.post("/retrieve", json={"question": QUESTIONS[0]}).json()["version"] == "v0006"


def test_an_old_version_lives_until_its_last_batch_ends(data, tmp_path):
    index = copy_index(data, tmp_path / "index")
    holder = open_holder(serve_config(index))
    encoder = holder.loader.query_model[0]
    old = holder.acquire()
    add_passage(index, 14, tmp_path)
    result = holder.reload()
    assert result.changed and holder.current.name == "v0002"
    assert holder.live_versions == ["v0001", "v0002"] and old.retrievers  # still in use
    assert old.retriever("dense").retrieve(QUESTIONS[:1], k=2)[0].passage_ids
    holder.release(old)
    assert holder.live_versions == ["v0002"] and old.retired and not old.retrievers
    assert holder.current.retrievers["dense"].searcher.model is encoder  # the query tower was not loaded again
    assert holder.reload().changed is False  # the pointer names the served version


def test_current_pointer_is_followed_by_polling(data, tmp_path):
    index = copy_index(data, tmp_path / "index")
    with LiveServer(serve_config(index, poll_seconds=0.05)) as server:
        add_passage(index, 15, tmp_path)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").json()["version"] != "v0002":
            assert time.monotonic() < deadline, "the new version was not picked up"
            time.sleep(0.05)
        body = httpx.post(f"{server.url}/retrieve", json={"question": "w15x0 w15x1 w15x2 ans15", "k": 1}).json()
        assert body["version"] == "v0002" and body["passages"][0]["id"] == "n15"
        pinned = httpx.post(f"{server.url}/admin/reload", json={"version": "v0001"}).json()  # a version by name
        assert pinned["changed"] and pinned["serving"] == "v0001"
        body = httpx.post(f"{server.url}/retrieve", json={"question": "w15x0 w15x1 w15x2 ans15", "k": 1}).json()
        assert body["version"] == "v0001" and body["passages"][0]["id"] != "n15"
        missing = httpx.post(f"{server.url}/admin/reload", json={"version": "v0009"})
        assert missing.status_code == 409 and "has no version 'v0009'" in missing.json()["error"]


# --- batching and disconnects ------------------------------------------------------------------------


def run_batcher(max_batch: int, window: float, jobs: int, max_pending: int = 256) -> tuple[list, list[int]]:
    sizes: list[int] = []

    def process(batch):
        sizes.append(len(batch))
        time.sleep(0.01)
        return [ValueError("odd") if job.request % 2 else job.request * 10 for job in batch]

    async def main():
        batcher = MicroBatcher(process, max_batch=max_batch, window=window, max_pending=max_pending)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(Job("retrieve", i)) for i in range(jobs)), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main()), sizes


def test_micro_batches_hold_concurrent_requests_and_keep_their_errors_apart():
    results, sizes = run_batcher(max_batch=8, window=0.05, jobs=20)
    assert sizes == [8, 8, 4]
    for i, result in enumerate(results):
        assert (isinstance(result, ValueError) and str(result) == "odd") if i % 2 else result == i * 10
    results, sizes = run_batcher(max_batch=1, window=0.0, jobs=5)
    assert sizes == [1] * 5 and results[4] == 40
    results, _ = run_batcher(max_batch=4, window=0.0, jobs=6, max_pending=3)
    assert sum(isinstance(r, Busy) for r in results) == 3 and results[0] == 0


@pytest.mark.parametrize(("window", "joined"), [(0.2, True), (0.0, False)])
def test_under_load_the_window_gathers_requests_arriving_apart(window, joined):
    sizes: list[int] = []

    def process(batch):
        sizes.append(len(batch))
        return [job.request for job in batch]

    async def main():
        batcher = MicroBatcher(process, max_batch=16, window=window)
        await batcher.start()
        try:
            await asyncio.gather(batcher.submit(Job("retrieve", 0)), batcher.submit(Job("retrieve", 1)))  # load: a batch of 2

            async def later(i):
                await asyncio.sleep(0.01 * i)
                return await batcher.submit(Job("retrieve", i))

            return await asyncio.gather(*(later(i) for i in range(2, 7)))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [2, 3, 4, 5, 6]
    assert sizes[0] == 2 and (sizes[1:] == [5] if joined else len(sizes) > 2)


def test_a_failing_batch_is_a_json_500_and_the_server_goes_on(data, monkeypatch):
    cfg = serve_config(data["index"])
    holder = open_holder(cfg)
    with TestClient(create_app(cfg, holder), raise_server_exceptions=False) as local:
        broken = holder.current.retrievers["dense"]
        monkeypatch.setattr(broken, "retrieve", lambda *a, **k: 1 / 0)
        response = local.post("/retrieve", json={"question": QUESTIONS[0]})
        assert response.status_code == 500 and "ZeroDivisionError" in response.json()["error"]
        monkeypatch.undo()
        assert local.post("/retrieve", json={"question": QUESTIONS[0]}).status_code == 200
        assert holder.in_flight == 0


def test_a_client_leaving_mid_request_harms_nothing(data):
    cfg = serve_config(data["index"], batch_window_ms=200)  # requests wait in the queue for their batch
    with LiveServer(cfg) as server:
        port = int(server.url.rsplit(":", 1)[1])
        body = json.dumps({"question": QUESTIONS[0], "k": 3}).encode()
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            try:  # a client that gives up before its answer comes
                httpx.post(f"{server.url}/retrieve", json={"question": QUESTIONS[1]}, timeout=0.01)
            except httpx.TimeoutException:
                pass
        response = httpx.post(f"{server.url}/retrieve", json={"question": QUESTIONS[0], "k": 3}, timeout=30)
        assert response.status_code == 200 and len(response.json()["passages"]) == 3
        deadline = time.monotonic() + 5
        while (server.holder.in_flight or server.app.state.batcher.pending) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.holder.in_flight == 0 and server.app.state.batcher.pending == 0


# --- the page ----------------------------------------------------------------------------------------


def test_the_page_calls_the_json_api(client):
    page = client.get("/?q=which")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for call in ('fetch("/version")', 'post("/answer"', 'post("/retrieve"', "URLSearchParams(location.search).get(\"q\")"):
        assert call in html, call
    # The calls as the script makes them, and every field it reads.
    info = client.get("/version").json()
    for field in ("index", "version", "passages", "generator", "retrieval"):
        assert field in info
    used = set(re.findall(r"data\.(\w+)", html)) | {f"timings.{t}" for t in re.findall(r"\bt\.(\w+)", html)}
    response = client.post("/retrieve", json={"question": QUESTIONS[0], "k": 5, "retrieval": info["retrieval"][0]})
    body = response.json()
    for field in used - {"answer", "error"}:
        value = body
        for part in field.split("."):
            value = value[part]
    assert set(re.findall(r"\bp\.(\w+)", html)) <= set(body["passages"][0])
    error = client.post("/retrieve", json={"question": ""}).json()
    assert error["error"]  # the script shows data.error of a refused request


# --- the command line --------------------------------------------------------------------------------


def test_serve_config_is_checked():
    assert ServeConfig(index="i").host == "127.0.0.1"
    assert ServeConfig(index="i", mine="m").modes == ("dense", "bm25")
    assert ServeConfig(index="i", mine="m", alpha="0.2").modes == ("dense", "bm25", "hybrid")
    single = ServeConfig(index="i", batching=False)
    assert (single.max_batch, single.batch_window_ms) == (1, 0.0)
    for bad, message in (({"port": 0}, "port=0"), ({"max_batch": 0}, "max_batch=0"), ({"device": "tpu"}, "device='tpu'"),
                         ({"index": ""}, "no index given")):
        with pytest.raises(RagkitError, match=re.escape(message)):
            ServeConfig(**{"index": "i", **bad})


@pytest.mark.slow
def test_ragkit_serve_listens_on_the_loopback(data):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, "-m", "ragkit.cli", "serve", str(data["index"]), "--port", str(port),
                                "--device", "cpu", "--poll-seconds", "0"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "ragkit serve did not answer"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health.json()["version"] == "v0001"
        response = httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"question": QUESTIONS[0], "k": 2})
        assert response.status_code == 200 and len(response.json()["passages"]) == 2
        listening = [c for c in __import__("psutil").Process(process.pid).net_connections("tcp") if c.status == "LISTEN"]
        assert [c.laddr.ip for c in listening] == ["127.0.0.1"]
    finally:
        process.terminate()
        process.wait(timeout=15)
    result = CliRunner().invoke(cli, ["serve", str(data["index"]), "--port", "0"])
    assert result.exit_code == 2 and result.output.strip() == "error: port=0 must be in 1..65535"
