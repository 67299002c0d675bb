"""EMO (Emote Portrait Alive) as a diffusers pipeline, importable alone: `from pipeline import EmoPipeline`.

Custom components are saved in `model_index.json` as ("pipeline", class name); diffusers' loader imports
this package and looks up `ModelMixin` here to know how to load them, hence its re-export.
"""

from diffusers import ModelMixin

from .loading import CONFIGS, LoadReport, build_pipeline, load_motion_module
from .models import AudioProjection, EmoUNet3DModel, FaceLocator, ReferenceNet, SpeedEncoder
from .pipeline_emo import EmoPipeline, EmoPipelineOutput

__all__ = [
    "CONFIGS",
    "AudioProjection",
    "EmoPipeline",
    "EmoPipelineOutput",
    "EmoUNet3DModel",
    "FaceLocator",
    "LoadReport",
    "ModelMixin",
    "ReferenceNet",
    "SpeedEncoder",
    "build_pipeline",
    "load_motion_module",
]
