"""gcr: the Python client of a gcr gateway (Generate, Critique, Refine).

    import gcr

    client = gcr.Client("http://localhost:8000", api_key="gcr_...")
    job = client.generate("a lighthouse at dusk, oil painting", loop={"max_rounds": 3}, wait=True)
    open("best.png", "wb").write(client.best_image(job.id))

`gcr.AsyncClient` has the same methods as coroutines. Needs only httpx, httpx-sse and
pydantic: the gcr-sdk distribution (`pip install ./sdk`) never installs the server or torch.
"""

from gcr import errors
from gcr.async_client import AsyncClient
from gcr.client import Client
from gcr.errors import APIConnectionError, APIStatusError, GcrError, WaitTimeout
from gcr.types import Critique, GenerateRequest, GenerationParams, JobDocument, JobEvent, LoopParams

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AsyncClient",
    "Client",
    "Critique",
    "GcrError",
    "GenerateRequest",
    "GenerationParams",
    "JobDocument",
    "JobEvent",
    "LoopParams",
    "WaitTimeout",
    "errors",
]
