"""`python -m emo_app download hallo`: Hallo's published weights -> an EmoPipeline folder, in one command.

Downloads only what the converter reads from the Hugging Face repo of the variant (`RELEASES`) with
`huggingface_hub.snapshot_download` (kept in the Hugging Face cache, so a second run downloads nothing), then
converts it with `pipeline.hallo.convert_hallo`. `hallo/net.pth` holds every trained tensor of both UNets and
their motion modules, so SD 1.5's UNet weights (3.4 GB) and AnimateDiff's motion module (1.8 GB) are not
downloaded: only the UNet's config.json, the VAE, wav2vec2 and the insightface models. Without a network the
same conversion runs on files already on disk: `python -m pipeline.convert hallo --release DIR --output OUT`.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from .models import ModelError

DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class HalloRelease:
    """A published Hallo variant: its Hugging Face repo and where its net.pth lies in it."""

    repo_id: str
    net: str  # path of net.pth inside the repo

    @property
    def allow_patterns(self) -> list[str]:
        """The repo files the converter reads; the rest (audio separator, SD UNet weights, motion module, and
        Hallo2's super-resolution and face-restoration models) stays on the hub."""
        return [
            self.net,
            "stable-diffusion-v1-5/unet/config.json",
            "sd-vae-ft-mse/config.json",
            "sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
            "wav2vec/wav2vec2-base-960h/*",
            "face_analysis/models/*",  # insightface: the face embedding of the portrait (Hallo's identity input)
        ]


# The hub's listings: Hallo2's net.pth 4.85 GB (fp16), the VAE 335 MB, wav2vec2 378 MB, face_analysis 431 MB.
# Hallo's and Hallo2's repos share the layout, except the folder of net.pth.
RELEASES = {
    "hallo": HalloRelease("fudan-generative-ai/hallo", "hallo/net.pth"),
    "hallo2": HalloRelease("fudan-generative-ai/hallo2", "hallo2/net.pth"),
}

MODEL_CARD = """\
# {variant}, converted to EmoPipeline

Converted by `python -m emo_app download hallo --variant {variant}` from the Hugging Face repo `{repo_id}`
(revision {revision}), stored as {dtype}. Run it with `python app.py --model {output}` or
`python -m emo_app generate --model {output} ...`.

Licences: Hallo's weights (net.pth) MIT, and its two UNets are fine-tuned from Stable Diffusion 1.5, whose
CreativeML OpenRAIL-M licence (and its use restrictions) carries over; the sd-vae-ft-mse VAE MIT; wav2vec2-base-960h
Apache-2.0; the insightface face-analysis models in `face_analysis/` are for non-commercial research use only.
"""


def default_output(variant: str) -> Path:
    """Where `download` writes a variant by default: `$XDG_CACHE_HOME/emo/<variant>` (`~/.cache/emo/<variant>`)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "emo" / variant


def _check_output(output: Path) -> None:
    """Refuse an output that would mix the model with other files (an earlier conversion is overwritten)."""
    if output.exists() and not output.is_dir():
        raise ModelError(f"--output '{output}' is a file: give a folder for the model")
    if output.is_dir() and any(output.iterdir()) and not (output / "model_index.json").is_file():
        raise ModelError(
            f"--output '{output}' is not empty and holds no model: give a new folder (an earlier conversion "
            "there would be overwritten)"
        )


def download_release(variant: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The files of `RELEASES[variant]` that the converter needs, in the Hugging Face cache (or `cache_dir`),
    laid out like Hallo's `pretrained_models/`. Returns the folder.

    Raises:
        ModelError: the hub could not be reached (offline, unknown repo, ...): one line naming the repo, that a
            network is needed, and the offline conversion command.
    """
    release = RELEASES[variant]
    try:
        return Path(
            snapshot_download(release.repo_id, allow_patterns=release.allow_patterns, cache_dir=cache_dir)
        )
    except Exception as error:  # offline, proxy, gated or moved repo: all mean "not downloadable now"
        reason = " ".join(str(error).split()).split(". ")[0] or type(error).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        net = "" if variant == "hallo" else f" --net DIR/{release.net}"
        raise ModelError(
            f"could not download {release.repo_id} from the Hugging Face Hub ({type(error).__name__}: {reason}): "
            f"this needs a network connection. Files already downloaded (Hallo's pretrained_models/ folder) "
            f"convert offline with: python -m pipeline.convert hallo --release DIR{net} --output OUT"
        ) from error


def download_hallo(
    variant: str = "hallo",
    output: str | os.PathLike | None = None,
    *,
    dtype: str = "fp16",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path, str]:
    """Download Hallo's weights of `variant` ("hallo" or "hallo2") and convert them into an EmoPipeline folder.

    Args:
        output: the model folder to write (default `default_output(variant)`); an earlier conversion there is
            overwritten, any other non-empty folder is refused.
        dtype: "fp16" (default, half the size), "bf16" or "fp32": the stored weights' precision.
        cache_dir: the Hugging Face cache to download into (default: huggingface_hub's, `$HF_HOME`).

    Returns:
        (the model folder, the converter's one-line summary).

    Raises:
        ModelError: an unknown variant or dtype, an unusable output folder, no network, or files that do not
            convert (one line each).
    """
    from pipeline.hallo import ConversionError, convert_hallo

    if variant not in RELEASES:
        raise ModelError(f"unknown Hallo variant {variant!r}: use one of {', '.join(RELEASES)}")
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    output = Path(output).expanduser() if output is not None else default_output(variant)
    _check_output(output)
    release = RELEASES[variant]
    root = download_release(variant, cache_dir)
    try:
        report = convert_hallo(root, output, net=root / release.net, dtype=dtype)
    except ConversionError as error:
        raise ModelError(f"the files of {release.repo_id} in '{root}' did not convert: {error}") from error
    (output / "README.md").write_text(
        MODEL_CARD.format(
            variant=variant,
            repo_id=release.repo_id,
            revision=root.name,
            dtype=dtype,
            output=shlex.quote(str(output)),
        )
    )
    return output, report.summary()
