"""Models edgebit knows by name, and where to download them.

Two kinds of source:

* ``"gguf"``: one ready GGUF file in a Hugging Face repository (downloaded as is);
* ``"checkpoint"``: a Hugging Face safetensors checkpoint, downloaded to the cache and converted
  to I2_S locally by `edgebit convert` (1bitLLM publishes no GGUF of its models).

Sizes and SHA-256 digests are recorded only where they are known from a source we can name;
`None` means unknown, and `edgebit pull` then reports the digest it computed and warns that the
file could not be verified. URLs use `$HF_ENDPOINT` (a mirror) when set, as huggingface_hub does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HF_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class RegistryModel:
    """A downloadable model: name, aliases, source repository and what is known about the file."""

    name: str
    aliases: tuple[str, ...]
    description: str
    kind: str  # "gguf" | "checkpoint"
    repo: str
    filename: str | None  # the GGUF file in `repo` (kind "gguf")
    size: int | None
    sha256: str | None
    license: str
    note: str = ""

    @property
    def store_name(self) -> str:
        """File name in the model store."""
        return f"{self.name}.gguf"

    def url(self, filename: str | None = None, revision: str = "main") -> str:
        """Download URL of a file of the repository (default: the GGUF file)."""
        endpoint = os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/")
        name = filename or self.filename
        if name is None:
            raise ValueError(f"{self.name} has no single file to download")
        return f"{endpoint}/{self.repo}/resolve/{revision}/{name}"


MODELS: tuple[RegistryModel, ...] = (
    RegistryModel(
        name="bitnet-b1.58-2b-4t",
        aliases=("2b4t", "bitnet-2b4t", "microsoft/bitnet-b1.58-2B-4T-gguf"),
        description="BitNet b1.58 2B4T (Microsoft), I2_S GGUF, 2.4 B parameters, chat model, 4096 context",
        kind="gguf",
        repo="microsoft/bitnet-b1.58-2B-4T-gguf",
        filename="ggml-model-i2_s.gguf",
        # sha256 from the shared test data README (§4); the byte size is the one several public
        # manifests give for that digest (revision a1f2f1c765812aa8af3f6eda4a313707064bba15).
        size=1_187_801_280,
        sha256="4221b252fdd5fd25e15847adfeb5ee88886506ba50b8a34548374492884c2162",
        license="MIT",
    ),
    RegistryModel(
        name="bitnet_b1_58-large",
        aliases=("1bitllm-large", "1bitLLM/bitnet_b1_58-large"),
        description="1bitLLM's reproduction of BitNet b1.58, large (~0.7 B parameters); converted to I2_S "
                    "after download",
        kind="checkpoint",
        repo="1bitLLM/bitnet_b1_58-large",
        filename=None,
        size=None,
        sha256=None,
        license="see the model card",
        note="no published GGUF and no known digests: the checkpoint is converted locally and not verified",
    ),
    RegistryModel(
        name="bitnet_b1_58-3b",
        aliases=("1bitllm-3b", "1bitLLM/bitnet_b1_58-3B"),
        description="1bitLLM's reproduction of BitNet b1.58, 3B (3.3 B parameters); converted to I2_S "
                    "after download",
        kind="checkpoint",
        repo="1bitLLM/bitnet_b1_58-3B",
        filename=None,
        size=None,
        sha256=None,
        license="see the model card",
        note="no published GGUF and no known digests; its ffn_down rows (8640) are not whole I2_S blocks, "
             "which edgebit runs but bitnet.cpp's kernels do not",
    ),
)


# Models shipped inside the package (no download): name → file under edgebit/models/. Rebuild with
# `edgebit train --sensors -o edgebit/models/edgebit-sensors.gguf` (see edgebit/train.py).
BUNDLED = {"edgebit-sensors": "edgebit-sensors.gguf"}


def bundled(name: str) -> str | None:
    """The path of the bundled model called `name` (case-insensitive), or None."""
    filename = BUNDLED.get(name.lower())
    if filename is None:
        return None
    path = Path(__file__).resolve().parent / "models" / filename
    return str(path) if path.is_file() else None


def lookup(name: str) -> RegistryModel | None:
    """The registry entry called `name` (or one of its aliases), case-insensitively."""
    key = name.lower()
    for model in MODELS:
        if key == model.name.lower() or key in (a.lower() for a in model.aliases):
            return model
    return None
