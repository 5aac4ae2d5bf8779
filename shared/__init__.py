"""Code shared by the Saguaro gateway, verify and draft services."""

import os

# Hub kernels would be fetched from a model hub at load time; Saguaro loads
# models from local directories only. transformers 5 enables them by default.
os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
