"""Speech with known mouth shapes: espeak-ng's phoneme events turned into a frame-by-frame mouth opening.

The clips of `../shared/data` teach the mouth head (`fit_mouth_head`) mostly one GRID speaker; a voice it never
heard (another language, a synthetic voice) gets a head that barely follows the syllables. espeak-ng speaks
any text in many voices and, through its C library, reports when each phoneme starts in the sound it made.
Each phoneme gets the jaw opening it needs (open vowels wide, close vowels narrow, the lips shut for p/b/m,
closed in pauses); smoothed over a frame or two for coarticulation, that is the 0..1 opening (the scale of
`talking_photos.normalised_opening`) of every video frame, from nothing but the text.

`espeak_utterance` speaks one text; `babble` makes random pseudo-word sentences (so no language's vocabulary
is needed and every voice gets every kind of syllable); `phoneme_opening` turns the events into frames.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import unicodedata
from dataclasses import dataclass

import numpy as np

# espeak-ng's speak_lib.h: AUDIO_OUTPUT_SYNCHRONOUS; espeakINITIALIZE_PHONEME_EVENTS | _PHONEME_IPA | _DONT_EXIT
_SYNCHRONOUS, _INIT_OPTIONS = 2, 0x0001 | 0x0002 | 0x8000
_EVENT_END_OF_LIST, _EVENT_PHONEME, _EVENT_MSG_TERMINATED = 0, 7, 6
_CHARS_UTF8, _POS_CHARACTER, _RATE = 1, 1, 1


class _Event(ctypes.Structure):  # espeak_EVENT (x86-64 and aarch64 layouts alike)
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds from the start of the text
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # the phoneme's IPA name, UTF-8, zero-terminated unless 8 bytes long
    ]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)

# Jaw opening of a phoneme, 0 (lips shut) .. 1 (an open vowel), by its first IPA symbol.
OPEN_VOWELS, OPEN_MID_VOWELS, MID_VOWELS = "aɑæɐɒʌä", "ɛɔœɜɞ", "əɘɵeoøɤ"
CLOSE_VOWELS = "iuyɯɨʉɪʊʏ"
VOWEL_OPENING = {
    **dict.fromkeys(OPEN_VOWELS, 1.0),
    **dict.fromkeys(OPEN_MID_VOWELS, 0.8),
    **dict.fromkeys(MID_VOWELS, 0.6),
    **dict.fromkeys(CLOSE_VOWELS, 0.35),
}
CONSONANT_OPENING = {
    **dict.fromkeys("pbmɸβ", 0.0),  # lips closed
    **dict.fromkeys("fvɱ", 0.1),  # lower lip on the teeth
    **dict.fromkeys("wɥ", 0.15),  # rounded, narrow
    "h": 0.4,  # the mouth of the vowel that follows
}
OTHER_CONSONANT = 0.25  # tongue consonants: the jaw half-closed
VOWELS = set(VOWEL_OPENING)


def phoneme_openness(name: str) -> tuple[float, float]:
    """An IPA phoneme name of espeak-ng -> its opening at its start and at its end (they differ for diphthongs:
    "aɪ" opens wide and closes); an empty name is a pause (0)."""
    vowels = [VOWEL_OPENING[c] for c in name if c in VOWELS]
    if vowels:
        return vowels[0], vowels[-1]
    letters = [
        c for c in name if unicodedata.category(c) in ("Ll", "Lu", "Lo")
    ]  # not the stress or length marks
    if not letters:
        return 0.0, 0.0
    value = CONSONANT_OPENING.get(letters[0], OTHER_CONSONANT)
    return value, value


@dataclass
class Utterance:
    """A text as espeak-ng spoke it: `waveform` (float32 in [-1, 1]) at `sampling_rate`, `phonemes` as (start
    in seconds, IPA name) in order; a phoneme lasts until the next one starts, the last until `end`."""

    text: str
    voice: str
    waveform: np.ndarray
    sampling_rate: int
    phonemes: list[tuple[float, str]]
    end: float


class _Espeak:
    """The espeak-ng C library, loaded and initialised once per process (it keeps global state)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError as error:
            raise RuntimeError(
                f"espeak-ng's library is missing ({error}): install it (Debian: apt-get install espeak-ng)"
            ) from None
        self.sampling_rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, None, _INIT_OPTIONS)
        if self.sampling_rate <= 0:
            raise RuntimeError("espeak-ng could not start: is its data folder (espeak-ng-data) installed?")
        self.lock = threading.Lock()
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[float, str]] = []
        self.callback = _CALLBACK(self._collect)  # kept referenced: the library calls it
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav, count, events) -> int:
        if count > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())
        i = 0
        while events[i].type != _EVENT_END_OF_LIST:
            event = events[i]
            if event.type == _EVENT_PHONEME:
                self.events.append((event.audio_position / 1000.0, event.id.decode("utf-8", "replace")))
            i += 1
        return 0

    def speak(self, text: str, voice: str, words_per_minute: int) -> Utterance:
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r} (list them with `espeak-ng --voices`)")
            self.lib.espeak_SetParameter(_RATE, int(words_per_minute), 0)
            self.chunks, self.events = [], []
            data = text.encode("utf-8")
            self.lib.espeak_Synth(ctypes.c_char_p(data), len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                  None, None)  # fmt: skip
            self.lib.espeak_Synchronize()
            samples = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
            waveform = samples.astype(np.float32) / 32768.0
            end = len(waveform) / self.sampling_rate
            return Utterance(text, voice, waveform, self.sampling_rate, list(self.events), end)


_ESPEAK: _Espeak | None = None


def espeak_available() -> bool:
    """Whether espeak-ng's C library can be loaded here."""
    try:
        ctypes.CDLL(ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1")
    except OSError:
        return False
    return True


def espeak_utterance(text: str, voice: str = "en-us", words_per_minute: int = 160) -> Utterance:
    """`text` spoken by espeak-ng's `voice`, with the start of every phoneme (its library, via ctypes)."""
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = _Espeak()
    return _ESPEAK.speak(text, voice, words_per_minute)


def phoneme_opening(utterance: Utterance, num_frames: int, fps: float = 25.0, smooth_frames: float = 1.0):
    """The mouth opening (0..1) at the middle of each of `num_frames` video frames: each phoneme's openness
    (`phoneme_openness`, a diphthong gliding from its first vowel to its last), 0 before the first phoneme and
    after the speech, smoothed by a Gaussian of `smooth_frames` frames (the lips move between phonemes)."""
    times = (np.arange(num_frames) + 0.5) / fps
    opening = np.zeros(num_frames)
    bounds = [start for start, _ in utterance.phonemes] + [utterance.end]
    for (start, name), stop in zip(utterance.phonemes, bounds[1:], strict=True):
        inside = (times >= start) & (times < stop)
        if not inside.any() or stop <= start:
            continue
        first, last = phoneme_openness(name)
        opening[inside] = first + (last - first) * (times[inside] - start) / (stop - start)
    if smooth_frames > 0:
        radius = int(np.ceil(3 * smooth_frames))
        kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / smooth_frames) ** 2)
        opening = np.convolve(np.pad(opening, radius, mode="edge"), kernel / kernel.sum(), mode="valid")
    return np.clip(opening, 0.0, 1.0)


SYLLABLE_ONSETS = ["", "b", "p", "m", "f", "v", "w", "t", "d", "n", "l", "s", "z", "k", "g", "h", "r", "j",
                   "sh", "ch", "th", "br", "pl", "st", "kr"]  # fmt: skip
SYLLABLE_VOWELS = ["a", "e", "i", "o", "u", "a", "o", "ai", "au", "ee", "oo", "ei"]
SYLLABLE_CODAS = ["", "", "", "n", "m", "s", "t", "l", "r", "p", "k"]


def babble(rng: np.random.Generator, words: tuple[int, int] = (4, 12)) -> str:
    """A random sentence of pseudo-words (one to three syllables each), with commas and full stops where a
    speaker pauses: every voice reads it by its own language's rules."""
    out = []
    for _ in range(int(rng.integers(*words))):
        syllables = int(rng.integers(1, 4))
        word = "".join(
            rng.choice(SYLLABLE_ONSETS) + rng.choice(SYLLABLE_VOWELS) + rng.choice(SYLLABLE_CODAS)
            for _ in range(syllables)
        )
        out.append(word + ("," if rng.random() < 0.12 else ""))
    return " ".join(out).rstrip(",").capitalize() + rng.choice([".", ".", "!", "?"])


# The voices `training_speech` speaks with: languages that read Latin letters, each in a few of espeak-ng's voice
# variants. `benchmarks/eval_embedded.py` measures lip-sync with en-us, en+f3, de, fr and es: kept out here.
TRAINING_LANGUAGES = ("en", "en-029", "en-gb-x-rp", "en-gb-scotland", "it", "pt", "pt-br", "nl", "pl", "sv",
                      "fi", "id", "tr", "ro", "cs", "ru", "hu", "sw", "es-419", "fr-be", "da", "el", "af",
                      "ms")  # fmt: skip
TRAINING_VARIANTS = ("", "+m1", "+m2", "+m4", "+m6", "+f1", "+f2", "+f4", "+f5", "+klatt")
HELD_OUT_VOICES = ("en-us", "en+f3", "de", "fr", "es")


def training_speech(
    count: int, seed: int = 0, fps: float = 25.0, sampling_rate: int = 16_000
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` random babble sentences (`babble`), each by a random voice of `TRAINING_LANGUAGES` x
    `TRAINING_VARIANTS` at 120-200 words a minute, with up to 0.6 s of silence before and after -> (waveform at
    `sampling_rate`, mono float32; the mouth opening of each video frame, `phoneme_opening`)."""
    from pipeline.audio import Audio

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        voice = str(rng.choice(TRAINING_LANGUAGES)) + str(rng.choice(TRAINING_VARIANTS))
        spoken = espeak_utterance(babble(rng), voice, int(rng.integers(120, 200)))
        lead, tail = rng.uniform(0.0, 0.6, size=2)
        silence = np.zeros(round(lead * spoken.sampling_rate), np.float32)
        after = np.zeros(round(tail * spoken.sampling_rate), np.float32)
        waveform = np.concatenate([silence, spoken.waveform, after])
        shifted = Utterance(spoken.text, voice, waveform, spoken.sampling_rate,
                            [(start + lead, name) for start, name in spoken.phonemes], spoken.end + lead)  # fmt: skip
        samples = Audio(waveform[None], spoken.sampling_rate).resample(sampling_rate).mono
        frames = int(len(samples) / sampling_rate * fps)
        out.append((samples, phoneme_opening(shifted, frames, fps)))
    return out
