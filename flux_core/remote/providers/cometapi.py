"""CometAPI, through its BFL pass-through (/flux/v1/flux-dev, then /flux/v1/get_result?id=...), the one
route CometAPI documents with flux-dev's own parameters (steps, guidance, seed, size). Its OpenAI-style
/v1/images/generations route is not used: whether it takes flux-dev and its knobs is unconfirmed.

Same body and statuses as BFL, a Bearer key, jpeg or png only, and the polling always goes to CometAPI
itself (a key for CometAPI is no key for BFL's clusters). A wrong path answers a redirect or a web page,
which becomes a clear error instead of being followed.
"""
from __future__ import annotations

from .bfl import BFL


class CometAPI(BFL):
    name = "cometapi"
    label = "CometAPI (flux-dev, BFL route)"
    model = "flux-dev"
    base_env = "FLUX_JUICED_COMETAPI_BASE_URL"
    default_base = "https://api.cometapi.com"
    trusted_hosts = ("cometapi.com",)
    expiry_hint = ("CometAPI's result links expire after about 10 minutes and finished tasks are forgotten; "
                   "run the job again")
    formats = {"jpg": "jpeg", "png": "png"}
    submit_path = "/flux/v1/flux-dev"
    follow_polling_url = False

    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def poll_fallback(self, task_id: str) -> str:
        return f"{self.base}/flux/v1/get_result?id={task_id}"
