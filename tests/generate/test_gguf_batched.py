"""The batched GGUF engine (llama.cpp multi-sequence batches, continuous batching) against
the serial GGUF path, which runs one sequence at a time and is the reference here."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from agentd.errors import FailedPrecondition, InvalidArgument, Unavailable
from agentd.generate.config import parse_lm_config
from agentd.generate.gguf_backend import load_gguf
from agentd.generate.gguf_engine import GGUFEngine
from agentd.generate.gguf_export import export_gguf
from agentd.generate.tokenizer import Tokenizer
from agentd.generate.types import SamplingParams
from agentd.testing import RunningServer, start_server

HF_DIR = Path(__file__).resolve().parents[2] / "models" / "tinylm" / "hf"
TOKENS = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=TOKENS)
CONTEXT = 128
TEXTS = [
    f"<|bos|>Once upon a time, there was a {animal} named {name}."
    for animal in ("fox", "owl", "cat", "dog")
    for name in ("Ada", "Bo")
]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_gguf(HF_DIR, tmp_path_factory.mktemp("gguf") / "model.f32.gguf", "f32")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = Tokenizer(HF_DIR / "tokenizer.json")
    return [tokenizer.encode(text) for text in TEXTS]


@pytest.fixture(scope="module")
def solo(gguf_file: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's greedy tokens run alone through the serial path."""
    generator = load_gguf(gguf_file, "serial", n_ctx=CONTEXT, threads=1)

    async def run() -> list[list[int]]:
        try:
            return [[t async for t in generator.stream(p, GREEDY)] for p in prompts]
        finally:
            await generator.close()

    tokens = asyncio.run(run())
    assert all(tokens)
    return tokens


@pytest.fixture(scope="module")
def engine(gguf_file: Path) -> Iterator[GGUFEngine]:
    engine = GGUFEngine(gguf_file, "batched", context_length=CONTEXT, max_batch=8, threads=1)
    yield engine
    asyncio.run(engine.close())


def _all_free(engine: GGUFEngine) -> bool:
    return engine.gauges()["blocks_free"] == engine.max_batch and all(
        engine.kv_tokens(slot) == 0 for slot in range(engine.max_batch)
    )


def test_eight_concurrent_greedy_sequences_equal_their_solo_serial_runs(
    engine: GGUFEngine, prompts: list[list[int]], solo: list[list[int]]
) -> None:
    async def run() -> list[list[int]]:
        async def one(prompt: list[int]) -> list[int]:
            return [t async for t in engine.stream(prompt, GREEDY)]

        return await asyncio.gather(*(one(p) for p in prompts))

    steps = engine.steps
    assert asyncio.run(run()) == solo
    # Batched: one llama_decode per step for all eight, not one per token of each.
    assert engine.steps - steps <= max(map(len, solo)) + 1
    assert _all_free(engine)


def test_sequences_join_mid_run_and_leave_early_without_disturbing_the_others(
    engine: GGUFEngine, prompts: list[list[int]], solo: list[list[int]]
) -> None:
    async def run() -> dict[int, list[int]]:
        results: dict[int, list[int]] = {}
        started = asyncio.Event()

        async def full(index: int) -> None:
            tokens = []
            async for token in engine.stream(prompts[index], GREEDY):
                tokens.append(token)
                if len(tokens) == 3:
                    started.set()
            results[index] = tokens

        async def leaver(index: int) -> None:
            stream = engine.stream(prompts[index], GREEDY)
            results[index] = [await anext(stream), await anext(stream)]
            await stream.aclose()

        first = [asyncio.create_task(full(i)) for i in (0, 1, 2)]
        first.append(asyncio.create_task(leaver(3)))
        await started.wait()  # the first ones are decoding: the rest join mid-run
        later = [asyncio.create_task(full(i)) for i in (4, 5)]
        later.append(asyncio.create_task(leaver(6)))
        await asyncio.gather(*first, *later)
        return results

    results = asyncio.run(run())
    for index, tokens in results.items():
        if index in (3, 6):
            assert tokens == solo[index][:2]
        else:
            assert tokens == solo[index], index
    assert _all_free(engine)


def test_prompts_prefilled_in_small_chunks_beside_running_sequences_give_the_same_tokens(
    gguf_file: Path, prompts: list[list[int]], solo: list[list[int]]
) -> None:
    async def run() -> tuple[list[list[int]], list[int]]:
        engine = GGUFEngine(
            gguf_file, "chunks", context_length=CONTEXT, max_batch=8, prefill_tokens=5
        )
        sizes: list[int] = []
        decode = engine._decode

        def recorded(plan):  # the tokens each llama_decode carries
            sizes.append(sum(len(tokens) for _, tokens in plan))
            return decode(plan)

        engine._decode = recorded  # type: ignore[method-assign]
        try:

            async def one(prompt: list[int]) -> list[int]:
                return [t async for t in engine.stream(prompt, GREEDY)]

            return list(await asyncio.gather(*(one(p) for p in prompts))), sizes
        finally:
            await engine.close()

    tokens, sizes = asyncio.run(run())
    assert tokens == solo
    # Steps mix running tokens with at most 5 prompt tokens: never more than 8 + 5.
    assert max(sizes) <= 8 + 5 and sum(sizes) >= sum(map(len, prompts))


def test_the_batched_flag_is_read_from_the_model_config(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_bytes(b"")
    base = {"kind": "language-model", "platform": "gguf", "model": "model.gguf"}
    base |= {"context_length": 64, "eos_token_ids": [1]}
    assert parse_lm_config(base, tmp_path).batched
    assert not parse_lm_config(base | {"batched": False}, tmp_path).batched
    with pytest.raises(InvalidArgument, match="batched"):
        parse_lm_config(base | {"batched": "sometimes"}, tmp_path)


def test_a_slot_freed_by_a_leaving_consumer_admits_a_waiting_sequence_at_once(
    gguf_file: Path, prompts: list[list[int]], solo: list[list[int]]
) -> None:
    long_run = SamplingParams(temperature=0.0, max_tokens=len(solo[0]))

    async def run() -> list[str]:
        engine = GGUFEngine(gguf_file, "two", context_length=CONTEXT, max_batch=2, threads=1)
        events: list[str] = []
        try:

            async def long(index: int) -> list[int]:
                tokens = [t async for t in engine.stream(prompts[index], long_run)]
                events.append("long done")
                return tokens

            async def leaver() -> None:
                stream = engine.stream(prompts[1], GREEDY)
                await anext(stream)
                await stream.aclose()

            async def waiting() -> list[int]:
                tokens = []
                async for token in engine.stream(prompts[2], GREEDY):
                    if not tokens:
                        events.append("waiting started")
                    tokens.append(token)
                return tokens

            tasks = [long(0), leaver(), waiting()]
            first, _, third = await asyncio.gather(*tasks)
            assert first == solo[0] and third == solo[2]
            assert _all_free(engine)
            return events
        finally:
            await engine.close()

    # The third sequence waited for a slot (max_batch 2) and got the leaver's at once, not
    # the long one's when it ended.
    assert asyncio.run(run()) == ["waiting started", "long done"]


def test_a_prompt_longer_than_the_context_is_a_clear_error(engine: GGUFEngine) -> None:
    with pytest.raises(InvalidArgument, match="its context is 128 tokens"):
        engine.stream([5] * (CONTEXT + 40), GREEDY)
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        engine.stream([5, engine.info.vocab_size], GREEDY)
    with pytest.raises(InvalidArgument, match="empty"):
        engine.stream([], GREEDY)


def test_a_file_llama_cpp_cannot_load_is_invalid_argument(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(InvalidArgument, match="cannot load GGUF model"):
        GGUFEngine(corrupt, "corrupt")
    with pytest.raises(InvalidArgument, match="max_batch"):
        GGUFEngine(corrupt, "corrupt", max_batch=1000)


def test_generation_stops_at_the_end_of_the_context(
    engine: GGUFEngine, prompts: list[list[int]]
) -> None:
    prompt = (prompts[0] * 20)[: CONTEXT - 4]

    async def run() -> list[int]:
        return [t async for t in engine.stream(prompt, SamplingParams(temperature=0.0))]

    assert len(asyncio.run(run())) <= 4
    assert _all_free(engine)


def test_closing_the_model_ends_open_streams_with_an_error(
    gguf_file: Path, prompts: list[list[int]]
) -> None:
    async def run() -> None:
        engine = GGUFEngine(gguf_file, "closing", context_length=CONTEXT, max_batch=2)
        first = asyncio.Event()

        async def read(prompt: list[int]) -> None:
            async for _ in engine.stream(prompt, GREEDY):
                first.set()

        readers = [asyncio.create_task(read(p)) for p in prompts[:3]]  # the third waits
        await first.wait()
        await engine.close()
        for outcome in await asyncio.gather(*readers, return_exceptions=True):
            assert isinstance(outcome, Unavailable) and "was closed" in str(outcome)
        with pytest.raises(FailedPrecondition, match="closed"):
            engine.stream(prompts[0], GREEDY)

    asyncio.run(asyncio.wait_for(run(), 60))


def _folder(root: Path, name: str, batched: bool) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    shutil.copy(HF_DIR / "tokenizer.json", folder / "tokenizer.json")
    config = {
        "name": name,
        "kind": "language-model",
        "platform": "gguf",
        "model": "model.gguf",
        "context_length": 256,
        "eos_token_ids": [1],
        "max_batch": 8,
        "batched": batched,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    export_gguf(HF_DIR, folder / "model.gguf", "f32")


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    models = tmp_path_factory.mktemp("plugins") / "models"
    _folder(models, "gguf-batched", batched=True)
    _folder(models, "gguf-serial", batched=False)
    running = start_server(["--plugins", str(models.parent)], timeout=90)
    yield running
    running.stop()


def test_the_served_model_answers_concurrent_openai_chat_requests_as_serial_does(
    lm_server: RunningServer,
) -> None:
    questions = [f"tell me a story about a {w}" for w in ("fox", "owl", "cat", "dog")]
    questions += ["what colour is the sky?", "what is 2 plus 3?"]

    async def answers(model: str) -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=lm_server.url + "/v1", api_key="-", max_retries=0
        ) as client:

            async def ask(question: str) -> str:
                reply = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": question}],
                    max_tokens=24,
                    temperature=0,
                )
                return reply.choices[0].message.content or ""

            return list(await asyncio.gather(*(ask(q) for q in questions)))

    batched = asyncio.run(answers("gguf-batched"))
    assert all(batched)
    assert batched == asyncio.run(answers("gguf-serial"))

    async def too_long() -> None:
        async with openai.AsyncOpenAI(
            base_url=lm_server.url + "/v1", api_key="-", max_retries=0
        ) as client:
            await client.completions.create(
                model="gguf-batched", prompt="a fox " * 400, max_tokens=4
            )

    with pytest.raises(openai.BadRequestError, match="context"):
        asyncio.run(too_long())
