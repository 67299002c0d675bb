"""espeak-ng's phoneme events as a mouth opening per frame (`training.spoken_phonemes`)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics import correlation, loudness_envelope
from training.spoken_phonemes import (
    HELD_OUT_VOICES,
    TRAINING_LANGUAGES,
    TRAINING_VARIANTS,
    Utterance,
    babble,
    espeak_available,
    phoneme_opening,
    phoneme_openness,
)

needs_espeak = pytest.mark.skipif(
    not espeak_available(), reason="needs espeak-ng (apt-get install espeak-ng)"
)


def test_each_phoneme_opens_the_jaw_as_it_needs():
    assert phoneme_openness("a") == (1.0, 1.0) and phoneme_openness("ɑː") == (1.0, 1.0)
    assert phoneme_openness("ɛ") == (0.8, 0.8) and phoneme_openness("ə") == (0.6, 0.6)
    assert phoneme_openness("i") == (0.35, 0.35) and phoneme_openness("ʊ") == (0.35, 0.35)
    assert phoneme_openness("aɪ") == (1.0, 0.35)  # a diphthong glides from wide to narrow
    assert phoneme_openness("p") == (0.0, 0.0) and phoneme_openness("m") == (0.0, 0.0)
    assert phoneme_openness("f") == (0.1, 0.1) and phoneme_openness("w") == (0.15, 0.15)
    assert phoneme_openness("t") == (0.25, 0.25) and phoneme_openness("ʃ") == (0.25, 0.25)
    assert phoneme_openness("") == (0.0, 0.0) and phoneme_openness("ˈ") == (0.0, 0.0)  # a pause


def test_phoneme_events_become_one_opening_per_frame():
    """p 0.1-0.2 s, a 0.2-0.4 s, a pause 0.4-0.5 s, aɪ 0.5-0.7 s, at 25 fps (frame i's middle: (i + 0.5) / 25)."""
    spoken = Utterance("pa ai", "test", np.zeros(20_000, np.float32), 16_000,
                       [(0.1, "p"), (0.2, "a"), (0.4, ""), (0.5, "aɪ")], 0.7)  # fmt: skip
    sharp = phoneme_opening(spoken, 20, smooth_frames=0)
    assert sharp.shape == (20,)
    np.testing.assert_allclose(sharp[:5], 0.0)  # silence, then the closed lips of p
    np.testing.assert_allclose(sharp[5:10], 1.0)  # a
    np.testing.assert_allclose(sharp[10:12], 0.0)  # the pause
    glide = sharp[12:17]
    assert glide[0] > 0.9 and glide[-1] < 0.5 and np.all(np.diff(glide) < 0)  # aɪ: wide to narrow
    np.testing.assert_allclose(sharp[18:], 0.0)  # after the speech
    smooth = phoneme_opening(spoken, 20, smooth_frames=1.0)
    assert 0.1 < smooth[4] < 0.5 and smooth[7] > 0.9  # the lips start opening a frame early
    assert np.all((smooth >= 0) & (smooth <= 1))


def test_babble_is_random_pseudo_words_reproducible_by_seed():
    first, again = babble(np.random.default_rng(5)), babble(np.random.default_rng(5))
    assert first == again and first != babble(np.random.default_rng(6))
    words = first.split()
    assert 4 <= len(words) < 12 and first[0].isupper() and first[-1] in ".!?"
    assert not set(HELD_OUT_VOICES) & {lang + v for lang in TRAINING_LANGUAGES for v in TRAINING_VARIANTS}


@needs_espeak
def test_espeak_speaks_with_the_time_of_every_phoneme():
    from training.spoken_phonemes import espeak_utterance

    spoken = espeak_utterance("Papa, bring my map. Mama is far away!", "en-us", 150)
    names = [name for _, name in spoken.phonemes]
    starts = [start for start, _ in spoken.phonemes]
    assert spoken.sampling_rate == 22_050 and "p" in names and "m" in names and "" in names
    assert starts == sorted(starts) and 0 <= starts[0] < 0.3 and starts[-1] < spoken.end
    assert spoken.end == pytest.approx(len(spoken.waveform) / spoken.sampling_rate)
    frames = int(spoken.end * 25)
    opening = phoneme_opening(spoken, frames)
    loud = loudness_envelope(spoken.waveform, spoken.sampling_rate, frames, 25.0)
    print("opening vs loudness r", correlation(opening, loud))
    assert correlation(opening, loud) > 0.5  # open vowels are loud, closed lips and pauses quiet
    with pytest.raises(ValueError, match="no voice 'xx-nowhere'"):
        espeak_utterance("hello", "xx-nowhere")


@needs_espeak
def test_training_speech_is_sixteen_kilohertz_sound_with_an_opening_per_frame():
    from training.spoken_phonemes import training_speech

    speech = training_speech(3, seed=2)
    again = training_speech(3, seed=2)
    assert len(speech) == 3
    for (waveform, opening), (waveform2, _) in zip(speech, again, strict=True):
        # the same sentences and voices again (espeak-ng keeps some state between calls: the timing moves a
        # little, up to tens of milliseconds)
        assert abs(len(waveform) - len(waveform2)) < 0.05 * len(waveform)
        assert waveform.dtype == np.float32 and len(opening) == int(len(waveform) / 16_000 * 25)
        assert opening.max() > 0.6 and opening.min() < 0.05  # wide vowels; closed lips and silence
        assert correlation(opening, loudness_envelope(waveform, 16_000, len(opening), 25.0)) > 0.4
