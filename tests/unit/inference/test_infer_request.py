"""InferenceService.infer_request: the call as the KServe adapters hand it over, answered
with the model version that computed it; the service resolves the deadline itself."""

from __future__ import annotations

import numpy as np
import pytest

from agentd.deadlines import DeadlinePolicy
from agentd.errors import DeadlineExceeded, NotFound
from agentd.inference import InferenceService, ModelRepository
from agentd.inference.onnx_runtime import OnnxLoader
from agentd.inference.types import InferenceRequest, InferenceResponse
from agentd.testing.models import write_mlp_model


@pytest.fixture
async def service(tmp_path):
    write_mlp_model(tmp_path, "mlp", max_queue_delay_us=100)
    svc = InferenceService(
        ModelRepository([OnnxLoader(threads=1)], [tmp_path]),
        deadlines=DeadlinePolicy(default_s=30.0),
    )
    await svc.start()
    yield svc
    await svc.aclose()


def _features(rows: int = 2) -> dict[str, np.ndarray]:
    return {"input": np.ones((rows, 16), np.float32)}


async def test_the_response_names_the_model_and_the_version_that_answered(service):
    response = await service.infer_request(InferenceRequest("mlp", _features(3)))
    assert isinstance(response, InferenceResponse)
    assert (response.model, response.version) == ("mlp", service.metadata("mlp").version)
    direct = await service.infer("mlp", _features(3))
    assert response.outputs.keys() == direct.keys()
    for name, array in direct.items():
        np.testing.assert_allclose(response.outputs[name], array, rtol=1e-6)


async def test_requested_outputs_and_an_explicit_version(service):
    version = service.metadata("mlp").version
    (name, *_) = [spec.name for spec in service.metadata("mlp").outputs]
    response = await service.infer_request(
        InferenceRequest("mlp", _features(), version=version, outputs=[name])
    )
    assert list(response.outputs) == [name] and response.version == version
    with pytest.raises(NotFound):
        await service.infer_request(InferenceRequest("mlp", _features(), version="999"))


@pytest.mark.parametrize(("timeout", "call_timeout"), [(30.0, 1e-9), (1e-9, 30.0)])
async def test_the_tighter_of_the_two_timeouts_applies(service, timeout, call_timeout):
    request = InferenceRequest("mlp", _features(), timeout=timeout, call_timeout=call_timeout)
    with pytest.raises(DeadlineExceeded, match=r"did not answer within 0\.000s"):
        await service.infer_request(request)
    # Either time alone, generous, lets the call through.
    for alone in (
        InferenceRequest("mlp", _features(), timeout=30.0),
        InferenceRequest("mlp", _features(), call_timeout=30.0),
    ):
        assert (await service.infer_request(alone)).model == "mlp"
