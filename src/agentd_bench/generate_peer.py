"""``agentd bench generate``, against llama.cpp: agentd and llama-cpp-python's OpenAI server
serving the same requests to the same random-weight GQA Llama, both over HTTP.

The bench builds the model itself (no download): a transformers ``LlamaConfig`` of about 86M
parameters (768 wide, 12 layers, 12 query heads sharing 4 key/value heads, vocab 32,000,
tied embeddings), random weights, a byte-level BPE tokenizer made of letter merges. It is
exported for agentd as int8 ONNX (paged) and as GGUF f16 and q8_0 (llama.cpp's quantizer),
cached under ``~/.cache/agentd/bench`` keyed by the config, so later runs start at once.

One ``agentd serve`` holds four model folders on those files (ONNX with the prefix cache on
and off, GGUF batched and serial); one ``python -m llama_cpp.server`` per GGUF file is the
peer (``--interrupt_requests False``, else it cancels a running request when another comes).
Every request is a streamed ``/v1/completions``, greedy with a fixed ``max_tokens``; the
model's end-of-sequence token has a zero embedding row, so its logit is 0 against the random
positive maximum of the others and no stream ends early (each must finish with ``length``).
agentd and the peer alternate, round after round, so both see the machine in the same state.

* single stream: tokens/s of one request (time to first token included). Target: agentd >=
  1.5x the faster peer.
* 16 concurrent requests: aggregate tokens/s. Target: >= 8x the faster peer.
* time to first token of requests sharing a 512-token system prompt, agentd's prefix cache
  on vs off. Target: >= 5x lower.
* agentd's GGUF engine at 16 concurrent requests, batched vs ``batched: false``. Target: >= 3x.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from agentd_bench.errors import BenchError
from agentd_bench.servers import ServerError, ServerProcess, agentd_env, free_port, log_tails

__all__ = ["FULL", "QUICK", "TARGETS", "build_artefacts", "missing_extra", "run_peer"]

FULL: dict[str, Any] = {
    "config": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 1536,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
    },
    "rounds": 3,
    "single_tokens": 128,
    "concurrent": 16,
    "concurrent_tokens": 64,
    "system_tokens": 512,
    "ttft_requests": 8,
}
# --quick checks the sections run end to end (nothing is concluded): a tiny model, one round.
QUICK: dict[str, Any] = {
    "config": {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
    },
    "rounds": 1,
    "single_tokens": 8,
    "concurrent": 4,
    "concurrent_tokens": 8,
    "system_tokens": 64,
    "ttft_requests": 3,
}
TARGETS = {"single_stream": 1.5, "concurrent": 8.0, "prefix_cache_ttft": 5.0, "gguf_batched": 3.0}
BOS, EOS = 1, 2
CONTEXT = 2048
CACHE_VERSION = 1  # bump when the build below changes what it writes
MODELS = ("lm", "lm-nocache", "lm-gguf", "lm-gguf-serial")


def missing_extra() -> str | None:
    """Why the section cannot run here (a package missing), or None."""
    for module, extra in (
        ("torch", "agentd[hf]"),
        ("transformers", "agentd[hf]"),
        ("llama_cpp", "agentd[gguf]"),
        ("gguf", "agentd[gguf]"),
        ("sse_starlette", "llama-cpp-python[server], in agentd[bench]"),
        ("starlette_context", "llama-cpp-python[server], in agentd[bench]"),
        ("pydantic_settings", "llama-cpp-python[server], in agentd[bench]"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({extra})"
    return None


# ---------------------------------------------------------------- the model


def _tokenizer(vocab_size: int) -> dict[str, Any]:
    """A byte-level BPE tokenizer.json of ``vocab_size`` tokens: the 256 bytes, then merges of
    lowercase letters (two-letter, then three-, then four-letter strings), so words of random
    letters take one or two tokens."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    vocab = {c: b for b, c in chars.items()}
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges: list[str] = []
    for size in (2, 3, 4):
        for combo in itertools.product(letters, repeat=size):
            if len(vocab) == vocab_size:
                break
            head = "".join(combo[:-1])
            merges.append(f"{head} {combo[-1]}")
            vocab["".join(combo)] = len(vocab)
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "added_tokens": [],
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
    }


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "agentd" / "bench"


def _build_into(folder: Path, config: dict[str, Any], progress: Callable[[str], None]) -> None:
    import llama_cpp
    import torch
    import transformers

    from agentd.generate.gguf_export import export_gguf
    from agentd.generate.onnx_export import export_onnx, quantize_int8

    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        **config,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(llama).eval()
    with torch.no_grad():
        # A zero row: the end-of-sequence logit is 0, below the largest of the others, so a
        # greedy stream never ends before max_tokens on either server.
        model.get_input_embeddings().weight[EOS].zero_()
    parameters = sum(p.numel() for p in model.parameters())
    hf = folder / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    (hf / "tokenizer.json").write_text(json.dumps(_tokenizer(config["vocab_size"])))
    progress(f"exporting the {parameters / 1e6:.1f}M-parameter model to int8 ONNX ...")
    fp32 = export_onnx(hf, folder / "fp32.onnx")
    quantize_int8(fp32, folder / "model.onnx")
    fp32.unlink()
    for data in folder.glob("fp32.onnx*"):
        data.unlink()
    progress("exporting it to GGUF f16 and q8_0 ...")
    export_gguf(hf, folder / "f16.gguf", dtype="f16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(
        str(folder / "f16.gguf").encode(), str(folder / "q8_0.gguf").encode(), ctypes.byref(params)
    )
    if status != 0:  # reported, and the peer runs f16 only
        (folder / "q8_0.gguf").unlink(missing_ok=True)
    (folder / "model.json").write_text(
        json.dumps({"parameters": parameters, "config": config, "q8_0_status": status})
    )


def build_artefacts(config: dict[str, Any], progress: Callable[[str], None]) -> Path:
    """The folder holding hf/, model.onnx (int8), f16.gguf, q8_0.gguf (when llama.cpp can
    quantize) and model.json; built once per config and kept in the cache."""
    key = hashlib.sha256(json.dumps([CACHE_VERSION, config], sort_keys=True).encode()).hexdigest()[
        :16
    ]
    folder = _cache_root() / f"peer-llama-{key}"
    if (folder / "model.json").is_file():
        return folder
    progress(f"building a random-weight GQA Llama ({config}) into {folder} ...")
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        _build_into(building, config, progress)
        with contextlib.suppress(OSError):  # another run finished first: keep its copy
            building.rename(folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    if not (folder / "model.json").is_file():
        raise BenchError(f"building the benchmark model into {folder} failed")
    return folder


# ---------------------------------------------------------------- servers


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _plugins(workdir: Path, artefacts: Path, concurrent: int) -> Path:
    """plugins/models/ with the four agentd model folders."""
    base = {
        "kind": "language-model",
        "tokenizer": "tokenizer.json",
        "eos_token_ids": [EOS],
        "max_batch": concurrent,
    }
    onnx = {"platform": "onnxruntime", "model": "model.onnx", "context_length": CONTEXT}
    gguf = {"platform": "gguf", "model": "model.gguf", "context_length": 1024}
    blocks = {"block_size": 16, "blocks": 512}
    configs = {
        "lm": onnx | {"kv_cache": blocks},
        "lm-nocache": onnx | {"kv_cache": blocks | {"prefix_cache": False}},
        "lm-gguf": gguf | {"batched": True},
        "lm-gguf-serial": gguf | {"batched": False},
    }
    sources = {"model.onnx": artefacts / "model.onnx", "model.gguf": artefacts / "f16.gguf"}
    for name, config in configs.items():
        folder = workdir / "plugins" / "models" / name
        folder.mkdir(parents=True)
        # Hard links (agentd wants a model's files inside its folder, not symlinked out);
        # the work folder is beside the cache so they are on one file system.
        _link(artefacts / "hf" / "tokenizer.json", folder / "tokenizer.json")
        model_file = str(config["model"])
        _link(sources[model_file], folder / model_file)
        # JSON is YAML: no quoting rules to get wrong.
        (folder / "config.yaml").write_text(json.dumps({"name": name, **base, **config}))
    return workdir / "plugins"


def _wait_models(port: int, names: list[str], server: ServerProcess, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        server.check_alive()
        if "failed to load" in server.log_path.read_text(errors="replace"):
            raise ServerError(f"{server.name}: a model failed to load")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
            if set(names) <= {m["id"] for m in listed.get("data", [])}:
                return
        if time.monotonic() > end:
            raise ServerError(f"{server.name} did not list {names} within {timeout:.0f}s")
        time.sleep(0.2)


@contextlib.contextmanager
def _servers(workdir: Path, artefacts: Path, spec: dict[str, Any]) -> Iterator[dict[str, int]]:
    """agentd serve and a llama_cpp.server per GGUF file; yields {"agentd": port, "f16": ...}."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    ports: dict[str, int] = {}
    started: list[tuple[ServerProcess, list[str]]] = []
    with contextlib.ExitStack() as stack:
        port = free_port()
        plugins = _plugins(workdir, artefacts, spec["concurrent"])
        argv = [sys.executable, "-m", "agentd", "serve", "--port", str(port)]
        argv += ["--plugins", str(plugins)]
        agentd = ServerProcess(
            "agentd serve", argv, port, workdir / "agentd.log", env=agentd_env(), cwd=workdir
        )
        started.append((agentd, list(MODELS)))
        ports["agentd"] = port
        for dtype in ("f16", "q8_0"):
            path = artefacts / f"{dtype}.gguf"
            if not path.is_file():
                continue
            port = free_port()
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(path)]
            argv += ["--model_alias", "lm", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--n_ctx", str(CONTEXT), "--n_threads", str(threads)]
            argv += ["--n_threads_batch", str(threads), "--interrupt_requests", "False"]
            peer = ServerProcess(f"llama_cpp.server {dtype}", argv, port, workdir / f"{dtype}.log")
            started.append((peer, ["lm"]))
            ports[f"llama.cpp {dtype}"] = port
        try:
            for server, _ in started:
                stack.enter_context(server)
            for server, names in started:
                _wait_models(server.port, names, server, timeout=120)
        except ServerError as exc:
            raise BenchError(f"{exc}\n{log_tails(workdir)}") from exc
        yield ports


# ---------------------------------------------------------------- requests


async def _complete(
    client: httpx.AsyncClient, port: int, model: str, prompt: str, max_tokens: int
) -> dict[str, Any]:
    """One streamed greedy completion: its time to first token, tokens and wall time."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    start = time.perf_counter()
    first: float | None = None
    chunks, finish = 0, None
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:300]
            raise BenchError(f"{model} on port {port} answered {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or []
            if not choices:
                continue
            if first is None:
                first = time.perf_counter()
            chunks += 1
            finish = choices[0].get("finish_reason") or finish
    wall = time.perf_counter() - start
    if finish != "length":
        raise BenchError(f"{model} on port {port} ended with {finish!r}, not after max_tokens")
    return {
        "ttft_s": (first or start) - start,
        "tokens": max_tokens,
        "chunks": chunks,
        "wall_s": wall,
    }


async def _load(
    client: httpx.AsyncClient, port: int, model: str, prompts: list[str], max_tokens: int
) -> dict[str, Any]:
    """All ``prompts`` at once: aggregate tokens/s."""
    start = time.perf_counter()
    done = await asyncio.gather(*(_complete(client, port, model, p, max_tokens) for p in prompts))
    wall = time.perf_counter() - start
    tokens = sum(d["tokens"] for d in done)
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "chunks": sum(d["chunks"] for d in done),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
    }


def _words(rng: np.random.Generator, count: int) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, size=rng.integers(3, 6))) for _ in range(count))


def _system_prompt(artefacts: Path, tokens: int) -> str:
    """Text of at least ``tokens`` tokens (agentd's tokenizer), a whole number of words."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(artefacts / "hf" / "tokenizer.json"))
    rng = np.random.default_rng(7)
    text = "system:"
    while len(tokenizer.encode(text).ids) < tokens:
        text += " " + _words(rng, 8)
    return text


def _summary(runs: list[dict[str, Any]], key: str = "tokens_per_s") -> dict[str, Any]:
    values = [run[key] for run in runs]
    return {
        key: round(statistics.median(values), 2),
        "runs": values,
        "spread": [round(min(values), 2), round(max(values), 2)],
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b > 0 else 0.0


async def _measure(ports: dict[str, int], artefacts: Path, spec: dict[str, Any], progress):
    rng = np.random.default_rng(3)
    agentd = ports["agentd"]
    peers = [name for name in ports if name != "agentd"]
    rounds, n = spec["rounds"], spec["concurrent"]
    single: dict[str, list[dict[str, Any]]] = {name: [] for name in ports}
    load: dict[str, list[dict[str, Any]]] = {name: [] for name in ports}
    gguf: dict[str, list[dict[str, Any]]] = {"batched": [], "serial": []}
    ttft: dict[str, list[float]] = {"on": [], "off": []}
    system = _system_prompt(artefacts, spec["system_tokens"])
    limits = httpx.Limits(max_connections=4 * n, max_keepalive_connections=4 * n)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for port in ports.values():  # warm up: first runs of each model and server
            await _complete(client, port, "lm", _words(rng, 4), 2)
        for model in MODELS[1:]:
            await _complete(client, agentd, model, _words(rng, 4), 2)
        for round_ in range(1, rounds + 1):
            prompt = _words(rng, 12)
            for name, port in ports.items():
                progress(f"round {round_}/{rounds}: one stream on {name} ...")
                single[name].append(
                    await _load(client, port, "lm", [prompt], spec["single_tokens"])
                )
            prompts = [_words(rng, 12) for _ in range(n)]
            for name, port in ports.items():
                progress(f"round {round_}/{rounds}: {n} concurrent requests on {name} ...")
                load[name].append(
                    await _load(client, port, "lm", prompts, spec["concurrent_tokens"])
                )
            for mode, model in (("batched", "lm-gguf"), ("serial", "lm-gguf-serial")):
                progress(f"round {round_}/{rounds}: {n} concurrent on agentd GGUF {mode} ...")
                gguf[mode].append(
                    await _load(client, agentd, model, prompts, spec["concurrent_tokens"])
                )
            progress(f"round {round_}/{rounds}: time to first token, shared system prompt ...")
            for cache, model in (("on", "lm"), ("off", "lm-nocache")):
                if round_ == 1:  # the prefix's first request pays its prefill: not measured
                    await _complete(client, agentd, model, f"{system} {_words(rng, 6)}", 1)
                for _ in range(spec["ttft_requests"]):
                    done = await _complete(client, agentd, model, f"{system} {_words(rng, 6)}", 1)
                    ttft[cache].append(done["ttft_s"] * 1e3)
    return {
        "peers": peers,
        "single_stream": {name: _summary(runs) for name, runs in single.items()},
        "concurrent": {name: _summary(runs) for name, runs in load.items()},
        "concurrent_runs": load,
        "gguf_16": {mode: _summary(runs) for mode, runs in gguf.items()},
        "gguf_runs": gguf,
        "prefix_ttft_ms": {
            cache: {
                "p50_ms": round(float(np.percentile(values, 50)), 2),
                "p90_ms": round(float(np.percentile(values, 90)), 2),
                "samples": len(values),
            }
            for cache, values in ttft.items()
        },
    }


def _targets(result: dict[str, Any], spec: dict[str, Any]) -> list[dict[str, Any]]:
    best_single = max(result["single_stream"][p]["tokens_per_s"] for p in result["peers"])
    best_load = max(result["concurrent"][p]["tokens_per_s"] for p in result["peers"])
    single = _ratio(result["single_stream"]["agentd"]["tokens_per_s"], best_single)
    load = _ratio(result["concurrent"]["agentd"]["tokens_per_s"], best_load)
    ttft = result["prefix_ttft_ms"]
    prefix = _ratio(ttft["off"]["p50_ms"], ttft["on"]["p50_ms"])
    gguf = result["gguf_16"]
    batched = _ratio(gguf["batched"]["tokens_per_s"], gguf["serial"]["tokens_per_s"])
    n, rounds = spec["concurrent"], spec["rounds"]
    rows = [
        (
            "peer_single_stream",
            single,
            "single-stream tokens/s, agentd (int8 ONNX) vs the "
            f"faster llama.cpp server (medians of {rounds} rounds)",
        ),
        (
            "peer_concurrent",
            load,
            f"aggregate tokens/s at {n} concurrent requests, agentd vs "
            f"the faster llama.cpp server (medians of {rounds} rounds)",
        ),
        (
            "prefix_cache_ttft",
            prefix,
            f"time to first token with a shared "
            f"{spec['system_tokens']}-token system prompt, prefix cache off / on (p50)",
        ),
        (
            "gguf_batched",
            batched,
            f"agentd GGUF aggregate tokens/s at {n} concurrent requests, "
            "batched vs batched: false (medians)",
        ),
    ]
    goal = dict(
        zip(
            ("peer_single_stream", "peer_concurrent", "prefix_cache_ttft", "gguf_batched"),
            TARGETS.values(),
            strict=True,
        )
    )
    return [
        {
            "name": name,
            "description": f"{text} >= {goal[name]:g}x",
            "value": value,
            "met": value >= goal[name],
        }
        for name, value, text in rows
    ]


def run_peer(progress: Callable[[str], None], quick: bool) -> dict[str, Any]:
    """The section's document: the model, figures and targets, or ``skipped`` and why."""
    spec = QUICK if quick else FULL
    why = missing_extra()
    if why is not None:
        return {"skipped": why, "targets": []}
    artefacts = build_artefacts(spec["config"], progress)
    model = json.loads((artefacts / "model.json").read_text())
    with tempfile.TemporaryDirectory(prefix="run-", dir=artefacts.parent) as tmp:
        workdir = Path(tmp)
        with _servers(workdir, artefacts, spec) as ports:
            try:
                result = asyncio.run(_measure(ports, artefacts, spec, progress))
            except (BenchError, httpx.HTTPError) as exc:
                raise BenchError(f"{exc}\n{log_tails(workdir)}") from exc
    return {
        "model": {
            "architecture": "LlamaForCausalLM (GQA), random weights",
            "parameters": model["parameters"],
            "config": model["config"],
            "agentd": "int8 ONNX, paged KV cache",
            "gguf": ["f16"] + (["q8_0"] if model["q8_0_status"] == 0 else []),
        },
        "spec": {k: v for k, v in spec.items() if k != "config"},
        **result,
        "targets": _targets(result, spec),
    }
