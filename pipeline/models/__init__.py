"""EMO's networks, one concept per file."""

from .audio_attention import AUDIO_ATTENTION_TYPES, AudioCrossAttention
from .audio_encoder import MelAudioEncoder
from .audio_projection import AudioProjection
from .backbone import EmoUNet3DModel, EmoUNetOutput
from .face_locator import FaceLocator
from .identity import IdentityProjection
from .reference_net import ReferenceNet, ReferenceNetOutput
from .speed import SpeedEncoder

__all__ = [
    "AUDIO_ATTENTION_TYPES",
    "AudioCrossAttention",
    "AudioProjection",
    "EmoUNet3DModel",
    "EmoUNetOutput",
    "FaceLocator",
    "IdentityProjection",
    "MelAudioEncoder",
    "ReferenceNet",
    "ReferenceNetOutput",
    "SpeedEncoder",
]
