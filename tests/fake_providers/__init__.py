"""Fake hosted providers on 127.0.0.1, one threaded HTTP server each, speaking each provider's wire protocol
(shared/reference/remote_api.md) with switches for every fault the client must survive. See base.py."""
from .base import FakeProvider, make_image
from .bfl import FakeBFL, FakeCometAPI
from .fal import FakeFal
from .inference_sh import FakeInferenceSh
from .replicate import FakeReplicate

FAKES = {"inference.sh": FakeInferenceSh, "bfl": FakeBFL, "fal": FakeFal, "replicate": FakeReplicate,
         "cometapi": FakeCometAPI}
BASE_ENV = {"inference.sh": "FLUX_JUICED_INFERENCE_BASE_URL", "bfl": "FLUX_JUICED_BFL_BASE_URL",
            "fal": "FLUX_JUICED_FAL_BASE_URL", "replicate": "FLUX_JUICED_REPLICATE_BASE_URL",
            "cometapi": "FLUX_JUICED_COMETAPI_BASE_URL"}

__all__ = ["FakeProvider", "make_image", "FakeBFL", "FakeCometAPI", "FakeFal", "FakeInferenceSh", "FakeReplicate",
           "FAKES", "BASE_ENV"]
