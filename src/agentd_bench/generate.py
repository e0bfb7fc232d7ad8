"""``agentd bench generate``: the token engine against its two baselines, in one run.

* Continuous batching: N concurrent streams (1, 8, 32, 64) on the engine as served (the
  built-in int8 model, one decode step for every active sequence, split across one lane per
  core), against the same engine limited to one sequence at a time. Target: >= 5x tokens/s
  at 32 streams.
* Pooled KV cache: one stream decoding from 448 to 512 tokens of context, the engine's
  block pool (fp32 paged graph, keys and values written in place) against a loop that grows
  the cache by concatenation every token (fp32 dense graph, the way a past_key_values cache
  is often kept). Both run in the same bare decode loop, so only the cache differs. Target:
  p99 inter-token latency >= 1.6x lower.
* Chunked prefill (reported, no target): a 960-token prompt joins 32 decoding streams; their
  largest inter-token gap while it is prefilled, with the default chunk budget and with the
  whole prompt in one run.

Streams ignore end-of-sequence so every run decodes the same number of tokens.

* Against llama.cpp (``generate_peer``): an ~86M-parameter GQA Llama built with random
  weights, served by ``agentd serve`` (int8 ONNX; GGUF batched and serial) and by
  llama-cpp-python's OpenAI server (GGUF f16 and q8_0), the same streamed requests over HTTP:
  single-stream and 16-request tokens/s, time to first token with a shared 512-token system
  prompt (prefix cache on vs off), GGUF batched vs serial. Skipped, with the reason, when a
  package it needs is missing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from agentd.generate.types import SamplingParams
from agentd_bench.errors import BenchError
from agentd_bench.generate_peer import run_peer
from agentd_bench.results import machine_info, package_versions, run_and_publish, utc_stamp

__all__ = ["BenchError", "run_suite"]

SUITE = "generate"
TARGET_BATCH_RATIO = 5.0
TARGET_CACHE_RATIO = 1.6
CONTEXT_START, CONTEXT_END = 448, 512
LEAD_IN = 64  # decode steps before the measured range
LONG_PROMPT = 960
REPEATS = 5
# --quick tests the bench itself (every section runs, nothing is concluded): fewer pairs of
# shorter streams (the one-at-a-time runs are most of its time).
QUICK_REPEATS = 3
QUICK_MAX_TOKENS = 16


def _hf_folder() -> Path:
    folder = Path("models/tinylm/hf")
    if not (folder / "model.safetensors").is_file():
        raise BenchError(f"{folder} is missing: run from a source checkout (make models)")
    return folder


def _builtin_model() -> Path:
    from agentd.inference.repository import builtin_models_dir

    path = builtin_models_dir() / "tinylm" / "model.onnx"
    if not path.is_file():
        raise BenchError(f"{path} is missing: run make models")
    return path


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    array = np.asarray(values) * 1e3
    return {
        "p50_ms": round(float(np.percentile(array, 50)), 3),
        "p99_ms": round(float(np.percentile(array, 99)), 3),
    }


async def _streams(engine, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    first: list[float] = []
    gaps: list[float] = []

    async def one(prompt: list[int]) -> int:
        start = last = time.perf_counter()
        count = 0
        async for _ in engine.stream(prompt, params):
            now = time.perf_counter()
            (first if count == 0 else gaps).append(now - (start if count == 0 else last))
            last = now
            count += 1
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - started
    return {
        "streams": len(prompts),
        "tokens": sum(counts),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(counts) / wall, 1),
        "ttft": _percentiles(first),
        "inter_token": _percentiles(gaps),
    }


def _prompts(count: int, vocab: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Ids above the special tokens (0..5), a BOS first as the model was trained.
    return [[0, *rng.integers(6, vocab, size=length - 1).tolist()] for _ in range(count)]


def _median(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run in the middle when ordered by ``key``."""
    return sorted(runs, key=lambda run: run[key])[len(runs) // 2]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return _median(runs, "tokens_per_s") | {
        "runs_tokens_per_s": [run["tokens_per_s"] for run in runs]
    }


def _served_engine(max_batch: int = 64):
    """The built-in model's engine as ``agentd serve`` sets it up (its config.yaml's pool
    and batch, one single-threaded lane per core), ignoring end-of-sequence."""
    from agentd.testing.lm import build_engine

    lanes = os.cpu_count() or 1
    return build_engine(
        _builtin_model(), blocks=1024, block_size=16, max_batch=max_batch, eos=(), lanes=lanes
    )


def _batching(progress, quick: bool) -> dict[str, Any]:
    levels = [1, 8, 32] if quick else [1, 8, 32, 64]
    max_tokens = QUICK_MAX_TOKENS if quick else 128
    repeats = QUICK_REPEATS if quick else REPEATS

    async def measure() -> dict[str, Any]:
        batched, serial = _served_engine(64), _served_engine(1)
        vocab = batched.info.vocab_size
        try:
            for warm in (batched, serial):
                await _streams(warm, _prompts(2, vocab, 16, seed=1), 4)
            points: dict[str, dict[str, Any]] = {}
            pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
            for streams in levels:
                progress(f"continuous batching, {streams} streams x {max_tokens} tokens ...")
                runs = []
                for i in range(repeats):
                    prompts = _prompts(streams, vocab, 16, seed=2 + i)
                    runs.append(await _streams(batched, prompts, max_tokens))
                    if streams == 32:
                        # The baseline runs right after each batched run, on the same
                        # prompts, so both see the machine in the same state (a shared
                        # 2-core machine drifts by 20% between seconds).
                        progress(f"one sequence at a time, 32 streams, run {i + 1} ...")
                        pairs.append((runs[-1], await _streams(serial, prompts, max_tokens)))
                points[str(streams)] = _median_run(runs)
        finally:
            await batched.close()
            await serial.close()
        ratios = sorted(b["tokens_per_s"] / s["tokens_per_s"] for b, s in pairs)
        return {
            "lanes": batched.lanes,
            "continuous": points,
            "one_at_a_time_32": _median_run([s for _, s in pairs]),
            "ratios_32": [round(r, 2) for r in ratios],
            "ratio_32": round(ratios[len(ratios) // 2], 2),
        }

    return {
        "model": _builtin_model().name,
        "max_tokens": max_tokens,
        "repeats": repeats,
    } | asyncio.run(measure())


async def _join_long_prompt(engine) -> dict[str, Any]:
    """32 streams decoding; a 960-token prompt joins. The running streams' largest gap
    while it is prefilled, and its time to first token."""
    vocab = engine.info.vocab_size
    params = SamplingParams(max_tokens=96, temperature=0.0)
    stamps: list[list[float]] = []

    async def running(prompt: list[int]) -> None:
        times: list[float] = []
        async for _ in engine.stream(prompt, params):
            times.append(time.perf_counter())
        stamps.append(times)

    streams = [asyncio.ensure_future(running(p)) for p in _prompts(32, vocab, 16, seed=3)]
    await asyncio.sleep(0.05)  # the 32 are decoding by now
    (prompt,) = _prompts(1, vocab, LONG_PROMPT, seed=4)
    joined = time.perf_counter()
    long = engine.stream(prompt, SamplingParams(max_tokens=8, temperature=0.0))
    await anext(long)
    first = time.perf_counter()
    async for _ in long:
        pass
    await asyncio.gather(*streams)
    gaps = [
        later - earlier
        for times in stamps
        for earlier, later in itertools.pairwise(times)
        if joined <= earlier <= first
    ]
    return {
        "long_ttft_ms": round((first - joined) * 1e3, 2),
        "running_max_gap_ms": round(max(gaps, default=0.0) * 1e3, 2),
    }


def _long_prompt(progress, quick: bool) -> dict[str, Any]:
    rounds = 1 if quick else 3

    async def measure(budget: int | None) -> dict[str, Any]:
        engine = _served_engine()
        if budget is not None:
            engine.prefill_tokens = budget
        try:
            await _streams(engine, _prompts(2, engine.info.vocab_size, 16, seed=1), 4)  # warm up
            runs = [await _join_long_prompt(engine) for _ in range(rounds)]
        finally:
            await engine.close()
        return {"prefill_tokens": engine.prefill_tokens, **_median(runs, "running_max_gap_ms")}

    progress(f"a {LONG_PROMPT}-token prompt joins 32 streams, chunked prefill ...")
    chunked = asyncio.run(measure(None))
    progress(f"a {LONG_PROMPT}-token prompt joins 32 streams, one prefill run ...")
    whole = asyncio.run(measure(LONG_PROMPT))
    return {"prompt_tokens": LONG_PROMPT, "rounds": rounds, "chunked": chunked, "whole": whole}


def _cache(progress, quick: bool) -> dict[str, Any]:
    from agentd.generate.onnx_export import export_onnx
    from agentd.generate.onnx_lm import graph_shape, open_session
    from agentd.testing.lm import dense_greedy, paged_decode

    rounds = 1 if quick else 15  # 64 measured steps each: ~10 samples above the p99
    # Each round prefills a shorter prompt and decodes up to the measured range, so the
    # samples are steady decode at that context (the first steps after a prefill run slower
    # on any cache while the CPU caches refill; they are not what "at 512 tokens" means).
    lead = CONTEXT_START - LEAD_IN
    steps = CONTEXT_END - lead
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        paged = export_onnx(_hf_folder(), Path(tmp) / "paged.onnx")
        dense = export_onnx(_hf_folder(), Path(tmp) / "dense.onnx", layout="dense")
        # One session each for all rounds, as a server keeps it; the first round warms them.
        # One thread each, as one stream runs in one of the engine's lanes.
        paged_session = open_session(paged, threads=1)
        dense_session = open_session(dense, threads=1, layout="dense")
        vocab = graph_shape(paged_session)["vocab_size"]
        pooled: list[float] = []
        grown: list[float] = []
        for round_ in range(rounds + 1):
            progress(f"KV cache at {CONTEXT_START}-{CONTEXT_END} tokens, round {round_} ...")
            (prompt,) = _prompts(1, vocab, lead, seed=10 + round_)
            paged_gaps = paged_decode(paged, prompt, steps + 1, session=paged_session)[1]
            dense_gaps = dense_greedy(dense, prompt, steps, session=dense_session)[1]
            if round_:  # gap i decodes with lead + i tokens of context
                pooled += paged_gaps[LEAD_IN:]
                grown += dense_gaps[LEAD_IN:]
    return {
        "context": [CONTEXT_START, CONTEXT_END],
        "rounds": rounds,
        "pooled": _percentiles(pooled),
        "concatenated": _percentiles(grown),
    }


def _measure(progress, quick: bool) -> dict[str, Any]:
    return {
        "batching": _batching(progress, quick),
        "cache": _cache(progress, quick),
        "long_prompt": _long_prompt(progress, quick),
        "peer": run_peer(progress, quick),
    }


def _build(measured: dict[str, Any], now: datetime, quick: bool) -> dict[str, Any]:
    batching, cache = measured["batching"], measured["cache"]
    batch_ratio = batching["ratio_32"]  # the median of the interleaved pairs' ratios
    cache_ratio = cache["concatenated"]["p99_ms"] / cache["pooled"]["p99_ms"]
    peer = dict(measured["peer"])
    peer_targets = peer.pop("targets")
    measured = measured | {"peer": peer}
    return {
        "suite": SUITE,
        "timestamp": utc_stamp(now),
        "quick": quick,
        "machine": machine_info(),
        "versions": package_versions(["agentd", "onnxruntime", "numpy"]),
        **measured,
        "targets": [
            {
                "name": "continuous_batching",
                "description": f"tokens/s at 32 streams >= {TARGET_BATCH_RATIO:g}x "
                f"one sequence at a time (median of {batching['repeats']} interleaved pairs)",
                "value": round(batch_ratio, 2),
                "met": batch_ratio >= TARGET_BATCH_RATIO,
            },
            {
                "name": "pooled_kv_cache",
                "description": f"p99 inter-token latency at {CONTEXT_END} tokens of context >= "
                f"{TARGET_CACHE_RATIO:g}x lower than growing the cache by concatenation",
                "value": round(cache_ratio, 2),
                "met": cache_ratio >= TARGET_CACHE_RATIO,
            },
            *peer_targets,
        ],
    }


def _render(doc: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"token engine, {doc['batching']['model']} "
        f"({doc['batching']['max_tokens']} tokens per stream)"
    )
    for column in ("mode", "streams", "tokens/s", "TTFT p50/p99 ms", "inter-token p50/p99 ms"):
        table.add_column(column)

    def row(name: str, point: dict[str, Any]) -> None:
        table.add_row(
            name,
            str(point["streams"]),
            f"{point['tokens_per_s']:,.0f}",
            f"{point['ttft']['p50_ms']:.1f} / {point['ttft']['p99_ms']:.1f}",
            f"{point['inter_token']['p50_ms']:.2f} / {point['inter_token']['p99_ms']:.2f}",
        )

    for point in doc["batching"]["continuous"].values():
        row("continuous batching", point)
    row("one at a time", doc["batching"]["one_at_a_time_32"])
    console.print(table)
    cache = doc["cache"]
    console.print(
        f"KV cache, {cache['context'][0]}-{cache['context'][1]} tokens of context, inter-token "
        f"p50/p99 ms: pooled {cache['pooled']['p50_ms']:.2f} / {cache['pooled']['p99_ms']:.2f}, "
        f"concatenated {cache['concatenated']['p50_ms']:.2f} / "
        f"{cache['concatenated']['p99_ms']:.2f}"
    )
    long = doc["long_prompt"]
    console.print(
        f"a {long['prompt_tokens']}-token prompt joins 32 running streams: their largest gap "
        f"{long['chunked']['running_max_gap_ms']:.1f} ms with chunked prefill "
        f"({long['chunked']['prefill_tokens']} tokens a run) vs "
        f"{long['whole']['running_max_gap_ms']:.1f} ms in one run; its TTFT "
        f"{long['chunked']['long_ttft_ms']:.1f} vs {long['whole']['long_ttft_ms']:.1f} ms"
    )
    _render_peer(doc["peer"], console)
    for target in doc["targets"]:
        mark = "met" if target["met"] else "NOT met"
        console.print(f"{target['description']}: {target['value']}x ({mark})")


def _render_peer(peer: dict[str, Any], console: Console) -> None:
    if "skipped" in peer:
        console.print(f"against llama.cpp: not run ({peer['skipped']})")
        return
    model = peer["model"]
    table = Table(
        title=f"against llama.cpp: random GQA Llama, {model['parameters'] / 1e6:.1f}M parameters "
        f"(agentd {model['agentd']}; GGUF {', '.join(model['gguf'])})"
    )
    for column in ("server", "1 stream tok/s", f"{peer['spec']['concurrent']} requests tok/s"):
        table.add_column(column)
    for name, single in peer["single_stream"].items():
        load = peer["concurrent"][name]
        table.add_row(
            name,
            f"{single['tokens_per_s']:,.1f} {single['spread']}",
            f"{load['tokens_per_s']:,.1f} {load['spread']}",
        )
    console.print(table)
    gguf, ttft = peer["gguf_16"], peer["prefix_ttft_ms"]
    console.print(
        f"agentd GGUF at {peer['spec']['concurrent']} requests: batched "
        f"{gguf['batched']['tokens_per_s']:,.1f} tok/s, "
        f"serial {gguf['serial']['tokens_per_s']:,.1f}"
        f"; TTFT with a shared {peer['spec']['system_tokens']}-token system prompt, p50: "
        f"prefix cache on {ttft['on']['p50_ms']:.1f} ms, off {ttft['off']['p50_ms']:.1f} ms"
    )


def run_suite(
    quick: bool = False, json_out: bool = False, results_dir: Path | None = None
) -> dict[str, Any]:
    return run_and_publish(
        SUITE,
        measure=lambda progress: _measure(progress, quick),
        build=lambda measured, now: _build(measured, now, quick),
        render=_render,
        json_out=json_out,
        results_dir=results_dir,
    )
