"""The text layer above the engine: token ids become text deltas that add up to the decoded
text, cut right before the first stop sequence to complete (held-back text never leaks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.generate.text_stream import TextStream
from agentd.generate.tokenizer import Tokenizer
from agentd.generate.types import LMInfo, SamplingParams
from agentd.inference.repository import builtin_models_dir

TOKENIZER = Tokenizer(builtin_models_dir() / "tinylm" / "tokenizer.json")


class ScriptedTokens:
    """A TextGenerator that replays fixed token ids (the text layer's input, isolated)."""

    def __init__(self, ids: list[int]) -> None:
        self._ids = ids
        self.closed = False

    @property
    def info(self) -> LMInfo:
        return LMInfo("scripted", "test", 1024, TOKENIZER.vocab_size, (1,))

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[int]:
        return self._replay(params.max_tokens)

    async def _replay(self, limit: int) -> AsyncIterator[int]:
        try:
            for token in self._ids[:limit]:
                yield token
        finally:
            self.closed = True

    async def close(self) -> None:
        pass


text = st.text(alphabet="ab cdé,.\n🙂z", max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    content=text, stops=st.lists(st.text(alphabet="ab cé🙂", min_size=1, max_size=3), max_size=3)
)
def test_deltas_add_up_to_the_text_cut_before_a_stop(content, stops):
    ids = TOKENIZER.encode(content)
    full = TOKENIZER.decode(ids)
    generator = ScriptedTokens(ids)
    params = SamplingParams(max_tokens=len(ids) + 1, stop=tuple(stops))
    stream = TextStream(generator, TOKENIZER, [0], params)

    async def collect() -> list[str]:
        return [piece async for piece in stream]

    pieces = asyncio.run(collect())
    out = "".join(pieces)
    assert all(pieces)
    # Checked after each token, as a server sees them: the text ends right before a stop
    # sequence and holds none, or there was none and it is the whole text.
    assert not any(stop in out for stop in stops)
    if any(stop in full for stop in stops):
        assert any(full.startswith(out + stop) for stop in stops)
    else:
        assert out == full
    assert stream.finish_reason == "stop"
    assert generator.closed


def test_max_tokens_reports_length_and_counts_tokens():
    ids = TOKENIZER.encode("a b c d e f g")

    async def run() -> TextStream:
        stream = TextStream(ScriptedTokens(ids), TOKENIZER, [0], SamplingParams(max_tokens=3))
        assert await stream.text() == TOKENIZER.decode(ids[:3])
        return stream

    stream = asyncio.run(run())
    assert stream.finish_reason == "length" and stream.completion_tokens == 3
