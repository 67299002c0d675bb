"""EMO (Emote Portrait Alive) as a diffusers pipeline, importable alone: `from pipeline import EmoPipeline`.

Names are imported lazily, so `pipeline.face` and `pipeline.audio` stay light (no torch/diffusers import).
Custom components are saved in `model_index.json` as ("pipeline", class name); diffusers' loader imports
this package and looks up `ModelMixin` here to know how to load them, hence its re-export.
"""

import importlib

_EXPORTS = {
    "EmoPipeline": ".pipeline_emo",
    "EmoPipelineOutput": ".pipeline_emo",
    "CONFIGS": ".loading",
    "LoadReport": ".loading",
    "build_pipeline": ".loading",
    "load_motion_module": ".loading",
    "AudioProjection": ".models",
    "EmoUNet3DModel": ".models",
    "FaceLocator": ".models",
    "IdentityProjection": ".models",
    "MelAudioEncoder": ".models",
    "ReferenceNet": ".models",
    "SpeedEncoder": ".models",
}

__all__ = [*_EXPORTS, "ModelMixin"]


def __getattr__(name: str):
    if name == "ModelMixin":
        from diffusers import ModelMixin

        return ModelMixin
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
