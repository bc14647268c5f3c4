"""ComfyUI entry point of the pack. Imports nothing heavy: node classes load torch and the engine only
when a node first runs, and an import problem is logged instead of breaking the host's start."""
import importlib.util
import logging

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

# Outside ComfyUI (the engine used alone, test collection) there is no host to register with.
if importlib.util.find_spec("folder_paths") is not None:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except Exception:  # pragma: no cover - keep the host alive whatever happens here
        logging.getLogger(__name__).exception("FLUX.1 [dev] Juiced: the nodes failed to load")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
