"""Rollouts from vLLM servers running apart from the trainer (``model.vllm.server_urls``): server mode.

For a policy whose sampling needs GPUs or nodes of its own. Each server is vLLM's OpenAI-compatible server, started
with the policy's folder and the settings this engine relies on (docs/rollout.md, "Server mode")::

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model <policy folder> \\
        --logprobs-mode processed_logprobs --generation-config vllm --trust-request-chat-template --port 8000

Prompts go to ``/v1/chat/completions`` as the project's own prompt text (the processor's chat-templated prompt,
each image's placeholder run folded to one, rendered through a template that passes it through unchanged) with its
images, and come back with the token ids vLLM made of them, checked against the processor's, row by row, as the
in-process engine checks them. Requests go concurrently, spread over the servers.

Weights reach the servers through a folder: the trainer writes the policy's full weights as safetensors (atomically,
rank 0) and each server reloads them in place (``/collective_rpc reload_weights`` with ``weights_path``, which its
dev mode serves). Passing tensors without the disk (NCCL between trainer and servers) is GPU-only and not built.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vlm_post.errors import ConfigError
from vlm_post.fs import atomic_path
from vlm_post.models.sharding import full_weight_buckets
from vlm_post.rollout.base import RolloutEngine, Rollouts, SamplingParams
from vlm_post.rollout.vllm import BANNED_LOGIT_BIAS, VLLMConfig, fold_image_placeholders

# The server's settings this engine relies on (docs/rollout.md, "Server mode"), after ``--model`` and ``--port``; the
# server also needs VLLM_SERVER_DEV_MODE=1 in its environment (for ``/collective_rpc``).
SERVER_FLAGS = (
    "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm", "--trust-request-chat-template"
)  # fmt: skip
# The chat template each request renders with: the prompt text as given (the processor already templated it).
PASS_THROUGH_TEMPLATE = "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"


class VLLMServerEngine(RolloutEngine):
    def __init__(self, processor, model_path: str, config: VLLMConfig, sync_dir: str | Path, seed: int = 0) -> None:
        super().__init__(processor)
        self.model_path, self.config, self.seed = str(model_path), config, seed
        self.urls = [url.rstrip("/") for url in config.server_urls]
        self.sync_dir = Path(sync_dir)
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.served_model: str | None = None
        self.synced = False  # the folder is emptied at the run's first sync: no file of another run's buckets stays

    def start(self) -> None:
        """Wait for every server to answer (up to ``server_wait_s``: servers started beside the trainer take minutes)
        and check that they serve one model, whose name goes in each request."""
        if self.served_model is not None:
            return
        names = set()
        for url in self.urls:
            deadline = time.monotonic() + self.config.server_wait_s
            while True:
                try:
                    models = self._call(url, "/v1/models", None, timeout=30)
                    break
                except ConfigError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(5)
            names.update(model["id"] for model in models.get("data", []))
        if len(names) != 1:
            raise ConfigError(f"model.vllm.server_urls {self.urls} serve the models {sorted(names)}: expected one")
        self.served_model = names.pop()

    def sync(self, policy: torch.nn.Module) -> None:
        """Give every server the policy's current weights: written by rank 0 as one safetensors folder, then reloaded
        in place by each server. Every rank takes part in gathering the sharded weights."""
        from safetensors.torch import save_file

        self.start()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        writer = not distributed or torch.distributed.get_rank() == 0
        folder = self.sync_dir / "weights"
        if writer and not self.synced:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = None if self.config.dtype == "auto" else getattr(torch, self.config.dtype)
        # One file per bucket: the same names at every sync (the buckets are fixed for a model), each replaced whole.
        for index, bucket in enumerate(full_weight_buckets(policy, self.config.sync_bucket_mb)):
            if writer:
                tensors = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in bucket}
                with atomic_path(folder / f"weights-{index:05d}.safetensors") as path:
                    save_file(tensors, str(path), metadata={"format": "pt"})
        if writer:
            for url in self.urls:
                self._call(
                    url, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
                )
                for cache in ("/reset_prefix_cache", "/reset_encoder_cache"):
                    self._call(url, cache, {})
        self.synced = True
        if distributed:
            torch.distributed.barrier()  # no rank samples before every server holds the new weights

    def generate(
        self,
        policy: torch.nn.Module,
        prompt: dict,
        params: SamplingParams,
        logprobs: bool = False,
        images: list[list] | None = None,
        seed: int | None = None,
    ) -> Rollouts:
        """Sample from the servers' weights: call ``sync`` first whenever the policy's weights changed."""
        self.start()
        rows = self.prompt_rows(prompt, images, seed)
        bodies = [
            self._request(tokens, row_images, params, logprobs, row_seed) for tokens, row_images, row_seed in rows
        ]
        with ThreadPoolExecutor(max_workers=min(64, len(bodies))) as pool:
            answers = list(pool.map(self._complete, range(len(bodies)), bodies))
        samples = []
        for row, (answer, (tokens, _, _)) in enumerate(zip(answers, rows)):
            if answer.get("prompt_token_ids") != tokens:
                got = len(answer.get("prompt_token_ids") or [])
                raise RuntimeError(
                    f"the vLLM server made {got} tokens of prompt {row} where the processor made {len(tokens)}:"
                    " its chat template or image processing differs from the project's processor"
                )
            for choice in answer["choices"]:
                values = [entry["logprob"] for entry in (choice.get("logprobs") or {}).get("content") or []]
                samples.append((choice["token_ids"], values))
        return self.rollouts_from_samples(prompt, samples, params.n, logprobs)

    def _request(self, ids: list[int], images: list, params: SamplingParams, logprobs: bool, seed: int | None) -> dict:
        text = self.processor.tokenizer.decode(fold_image_placeholders(ids, self.image_token_id))
        content = [{"type": "image_url", "image_url": {"url": _data_url(image)}} for image in images]
        body = {
            "model": self.served_model,
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
            "chat_template": PASS_THROUGH_TEMPLATE,
            "add_generation_prompt": False,
            "n": self.draws(params),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "max_tokens": params.max_new_tokens,
            "repetition_penalty": 1.0,
            "stop_token_ids": self.stop_ids,
            "logit_bias": {str(token): BANNED_LOGIT_BIAS for token in self.banned},
            "skip_special_tokens": False,
            "return_token_ids": True,
            "seed": seed,
        }
        if logprobs:
            body.update(logprobs=True, top_logprobs=0)
        return body

    def _complete(self, index: int, body: dict) -> dict:
        """One request to one server: rows spread round-robin over the servers."""
        return self._call(self.urls[index % len(self.urls)], "/v1/chat/completions", body)

    def _call(self, url: str, path: str, body: dict | None, timeout: float | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.config.server_timeout_s) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as error:
            detail = " ".join(error.read().decode(errors="replace").split())[:300]
            raise RuntimeError(f"the vLLM server {url} refused {path}: HTTP {error.code}: {detail}") from error
        except (urllib.error.URLError, OSError) as error:
            raise ConfigError(
                f"model.vllm.server_urls: no vLLM server answers at {url} ({error}); start it as docs/rollout.md "
                "says (Server mode), or give it longer: model.vllm.server_wait_s"
            ) from error
        return json.loads(raw) if raw.strip() else {}

    def close(self) -> None:
        """The servers outlive the run; only the synced weights' folder goes."""
        self.served_model, self.synced = None, False
        shutil.rmtree(self.sync_dir / "weights", ignore_errors=True)


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
