"""Server mode (``model.vllm.server_urls``): rollouts from a vLLM server running apart from the trainer.

A real server (vLLM's OpenAI-compatible one, started as docs/rollout.md says, on the CPU build) serves the module;
its start, about a minute here, is most of the cost. Runs in .venv-vllm (``make test-vllm``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: make test-vllm runs these in .venv-vllm")

from tests.helpers import examples_with_0_1_2_images, unmoved  # noqa: E402
from tests.test_vllm_rollouts import monitor, rl_fit, sampled_distribution_logprobs  # noqa: E402
from vlm_post.data.collate import Collator  # noqa: E402
from vlm_post.errors import ConfigError  # noqa: E402
from vlm_post.models.loading import load_policy, load_processor  # noqa: E402
from vlm_post.rollout import HFGenerateEngine, RolloutBatch, SamplingParams  # noqa: E402
from vlm_post.rollout.vllm import VLLMConfig  # noqa: E402
from vlm_post.rollout.vllm_server import SERVER_FLAGS, VLLMServerEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def head64(tmp_path_factory):
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vllm_server") / "tiny-head64", hidden_size=256)


@pytest.fixture(scope="module")
def server(head64, tmp_path_factory):
    """docs/rollout.md's server command, on the CPU (float32, a 1 GiB KV cache, prompts scheduled whole)."""
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(head64), "--port", str(port),
        *SERVER_FLAGS,
        "--limit-mm-per-prompt", '{"image": 8, "video": 0}',
        "--dtype", "float32", "--max-model-len", "1024", "--no-enable-chunked-prefill",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path_factory.mktemp("vllm_server_log") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            break
        except OSError:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start in 10 minutes"
            time.sleep(2)
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def policy_and_engine(head64, server, tmp_path_factory):
    processor = load_processor(str(head64))
    policy = load_policy(str(head64)).eval()
    # Weights unlike the folder's (the server's own), so only a working sync makes the engines agree.
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = VLLMConfig(dtype="float32", server_urls=[server], sync_bucket_mb=1.0)
    engine = VLLMServerEngine(processor, str(head64), config, tmp_path_factory.mktemp("sync"))
    engine.sync(policy)
    yield processor, policy, engine
    engine.close()


def _batch(processor):
    examples = examples_with_0_1_2_images()
    return Collator(processor)(examples), [example.images for example in examples]


def test_greedy_ids_equal_hf_generate(policy_and_engine):
    """Prompts of 0, 1 and 2 images: the server's token ids of each prompt equal the processor's (checked row by
    row in ``generate``), and its greedy answers from the synced weights equal HF ``generate``'s."""
    processor, policy, engine = policy_and_engine
    batch, images = _batch(processor)
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=24)
    hf = HFGenerateEngine(processor).generate(policy, batch["prompt"], greedy)
    ours = engine.generate(policy, batch["prompt"], greedy, images=images)
    assert ours.texts == hf.texts
    assert torch.equal(ours.response_mask, hf.response_mask) and torch.equal(ours.finished, hf.finished)


def test_sampled_tokens_logprobs_equal_the_policys(policy_and_engine):
    """The server's log-probs of its samples are those of the synced policy's distribution (fp32: within 1e-4)."""
    processor, policy, engine = policy_and_engine
    batch, images = _batch(processor)
    params = SamplingParams(n=4, temperature=0.7, max_new_tokens=16)
    rollouts = engine.generate(policy, batch["prompt"], params, logprobs=True, images=images, seed=3)
    samples = RolloutBatch.from_rollouts(batch["prompt"], batch["image_counts"], rollouts, params.n)
    expected = sampled_distribution_logprobs(policy, samples, engine.banned, params.temperature)
    mask = samples.response_mask.bool()
    assert mask.sum() > 20
    assert (samples.sampler_logprobs - expected)[mask].abs().max() < 1e-4
    again = engine.generate(policy, batch["prompt"], params, logprobs=True, images=images, seed=3)
    assert torch.equal(again.response_ids, rollouts.response_ids), "a seeded request draws the same samples"


def test_rl_samples_from_the_server_at_every_step(head64, demo_data, tmp_path, server):
    """An RL fit with server mode: before every step the policy's weights go to the server through the run's folder,
    and the server's log-probs of its samples equal the policy's at every step."""
    config = VLLMConfig(dtype="float32", server_urls=[server], sync_bucket_mb=1.0)
    module = rl_fit(head64, demo_data, tmp_path, steps=2, vllm=config)
    assert len(module.gaps) == 2 and max(module.gaps) < 1e-4, module.gaps
    assert len(monitor(module)) == 2 and max(monitor(module)) < 1e-4, monitor(module)
    assert all(step["train/time_weight_sync_s"] > 0 for step in module.logged)
    assert not unmoved(module.policy, module.before)
    assert not (tmp_path / "vllm_sync" / "weights").exists(), "the synced weights' folder goes at the end of fit"


def test_no_server_is_one_line_naming_the_address(head64, tmp_path):
    processor = load_processor(str(head64))
    url = f"http://127.0.0.1:{free_port()}"
    config = VLLMConfig(server_urls=[url], server_wait_s=1.0)
    with pytest.raises(ConfigError, match=f"no vLLM server answers at {url}"):
        VLLMServerEngine(processor, str(head64), config, tmp_path).start()
