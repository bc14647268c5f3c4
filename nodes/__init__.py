"""ComfyUI glue: node classes speaking the host's standard types. Filled in by the node-pack work."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
