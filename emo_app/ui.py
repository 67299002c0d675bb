"""The Gradio app: a portrait and a voice -> a talking video, with readable progress and a cancel button.

`build_demo(pipe, model_info)` builds the page; `app.py` loads the model and launches it with `THEME` and
`CSS` (Gradio 6 takes them in `launch()`). One generation runs at a time: the queue's concurrency limit is 1,
and a lock makes a cancelled run (which stops after its current denoising step) finish before the next starts,
so two users never hold the model's memory at once. The Advanced controls follow what `model_info` says the model
reads: the head speed only with speed layers, the pose/face/lip weights only with Hallo's region audio modules.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import torch

from pipeline.presets import PRESETS

from .generate import GenerationResult, GenerationSettings, InputError, estimate, generate

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLES = [[str(EXAMPLES_DIR / "portrait.png"), str(EXAMPLES_DIR / "speech.wav")]]

THEME = gr.themes.Soft(primary_hue="indigo")
CSS = """
#estimate, #result {min-height: 1.5em}
"""

INTRO = """\
# EMO: Emote Portrait Alive
A portrait and a voice become a video of that face speaking or singing
([Tian et al., 2024](https://arxiv.org/abs/2402.17485), open-source re-implementation).

**1.** Add a portrait: a photo with one clearly visible, front-facing face. **2.** Add a voice: upload an audio
file or record one. **3.** Press **Generate**. Or click the example below the inputs first.
"""

MODEL_PRESET = "model default"
PRESET_INFO = (
    "quality: 40 DDIM steps · balanced: 20 DPM-Solver++ steps · fast: 10 steps, guidance on the first 5."
)
NO_AUDIO_YET = "Add a voice to see how long the video will be."
REGION_WEIGHT_SLIDERS = (  # Hallo's models: the weights of its full/face/lip audio branches
    ("Pose weight", "How strongly the voice moves the head (0 = off, 1 = as trained)."),
    ("Face weight", "How strongly the voice drives the expression (0 = off, 1 = as trained)."),
    ("Lip weight", "How strongly the voice drives the lips (0 = off, 1 = as trained)."),
)

FULL_SIZE_HOWTO = """\
**Load a full-size model:** start the app with `python app.py --model <folder or Hugging Face hub id>`, or set
`EMO_MODEL=<folder or hub id>` (on a Space: a variable in its settings). Small GPUs: add `--low-vram`.
"""

SMALL_MODEL_NOTE = """\
- **It can** run the whole EMO pipeline on any computer, offline, about 7 s per second of video on a 2-core
  CPU: it keeps your photo's person (face shape, hair, skin tone, clothing, background) at
  {resolution}×{resolution} pixels, opens and closes the mouth with the voice (closed in silence), and writes an mp4 with your sound.
- **It cannot** keep fine detail: faces come out soft (eyes and teeth blur), the mouth can smear, the head
  moves little, and the mouth sometimes opens wider than a real one: it was trained for hours on a CPU. For
  real quality, load a full-size model.
"""


def model_markdown(info: dict) -> str:
    """The model panel: which model is loaded, what it can do, and how to load another one."""
    text = (
        f"**Model:** `{info['name']}` · {info['parameters'] / 1e6:,.1f} M parameters · "
        f"{info['resolution']}×{info['resolution']} px · {info['device']}, {info['dtype']}\n\n"
    )
    if info["embedded"]:  # the summary of another model repeats the line above
        text += info["summary"] + "\n\n" + SMALL_MODEL_NOTE.format(resolution=info["resolution"]) + "\n"
    elif info.get("hallo"):  # what the weights are, their licences, the GPU they need
        text += info["summary"] + "\n\n"
    return text + FULL_SIZE_HOWTO


def estimate_markdown(plan: dict, steps: int) -> str:
    """One line about the video the current inputs will make."""
    return (
        f"Video: **{plan['duration_s']:.1f} s**, {plan['num_frames']} frames in {plan['num_clips']} "
        f"clip{'s' if plan['num_clips'] != 1 else ''} × {steps} denoising steps."
    )


def result_markdown(result: GenerationResult) -> str:
    """What was made, how long it took, and the seed to make it again."""
    return (
        f"{result.duration_s:.1f} s, {result.num_frames} frames, made in {result.seconds:.1f} s. "
        f"Seed **{result.seed}** (untick *Random seed* and enter it to make this video again)."
    )


def build_demo(
    pipe, model_info: dict, *, run_on_device: Callable[[Callable], Callable] = lambda fn: fn
) -> gr.Blocks:
    """The app's page around a loaded `EmoPipeline`.

    model_info: `emo_app.models.describe_model(pipe, path)`. run_on_device: a decorator for the event handler that
    runs the model (on Hugging Face ZeroGPU Spaces, `spaces.GPU(duration=...)`).
    """
    defaults = GenerationSettings().with_model_defaults(pipe.resolved_defaults())
    outputs = tempfile.TemporaryDirectory(prefix="emo-app-")  # one video per session; removed at exit
    model_lock = threading.Lock()
    cancel_flags: dict[str, threading.Event] = {}  # session -> the flag its running generation watches
    progress_tracker = gr.Progress()

    region_audio = bool(model_info.get("region_audio"))  # Hallo's models: pose/face/lip weights
    speed_layers = bool(model_info.get("speed_layers", True))  # EMO's models: head speed

    def settings_from(
        steps, guidance, head_speed, seed, random_seed, paste_back, max_length, preset=MODEL_PRESET,
        pose_weight=1.0, face_weight=1.0, lip_weight=1.0,
    ) -> GenerationSettings:  # fmt: skip
        weights = dict(
            pose_weight=float(pose_weight), face_weight=float(face_weight), lip_weight=float(lip_weight)
        )
        return GenerationSettings(
            preset=None if preset in (None, MODEL_PRESET) else preset,
            steps=int(steps),
            guidance_scale=float(guidance),
            head_speed=float(head_speed) if speed_layers else None,
            seed=None if random_seed else int(seed),
            paste_back=bool(paste_back),
            max_duration=float(max_length),
            **(weights if region_audio else {}),
        )

    def preset_steps(name: str) -> int:
        """The steps slider follows the chosen preset (the model's own steps for "model default")."""
        return PRESETS[name].num_inference_steps if name in PRESETS else defaults.steps

    def video_path(request: gr.Request) -> Path:
        return Path(outputs.name) / request.session_hash / "emo.mp4"

    def show_estimate(audio, steps, max_length) -> str:
        if audio is None:
            return NO_AUDIO_YET
        try:
            return estimate_markdown(
                estimate(pipe, audio, GenerationSettings(max_duration=float(max_length))), steps
            )
        except InputError as error:
            return f"⚠️ {error}"

    @run_on_device
    def run(
        image, audio, steps, guidance, head_speed, seed, random_seed, paste_back, max_length,
        preset=MODEL_PRESET, pose_weight=1.0, face_weight=1.0, lip_weight=1.0,
        request: gr.Request = None, progress=progress_tracker,
    ):  # fmt: skip
        if image is None:
            raise gr.Error(
                "Add a portrait first: upload a photo or take one with the webcam.", print_exception=False
            )
        if audio is None:
            raise gr.Error("Add a voice first: upload an audio file or record one.", print_exception=False)

        def report(clip: int, num_clips: int, step: int, num_steps: int) -> None:
            desc = f"clip {clip + 1}/{num_clips} · step {step}/{num_steps}"
            progress((clip * num_steps + step, num_clips * num_steps), desc=desc, unit="steps")

        cancel = cancel_flags[request.session_hash] = threading.Event()
        try:
            settings = settings_from(
                steps, guidance, head_speed, seed, random_seed, paste_back, max_length, preset,
                pose_weight, face_weight, lip_weight,
            ).with_model_defaults(pipe.resolved_defaults())  # fmt: skip
            plan = estimate(pipe, audio, settings)
            progress(0, desc=f"Starting: {estimate_markdown(plan, settings.steps).replace('**', '')}")
            with model_lock:
                result = generate(
                    pipe, image, audio, video_path(request), settings, progress=report, cancel=cancel
                )
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error(
                "Out of GPU memory: use a shorter audio, or restart the app with --low-vram."
            ) from None
        except Exception as error:
            logger.exception("Generation failed")
            raise gr.Error(
                f"Generation failed ({type(error).__name__}: {error}). The app still runs: try again, or report "
                "this with the server log."
            ) from None
        finally:
            if cancel_flags.get(request.session_hash) is cancel:
                del cancel_flags[request.session_hash]
        if result.cancelled:
            return gr.skip(), "Cancelled."
        return str(result.path), result_markdown(result)

    def stop(request: gr.Request):
        if flag := cancel_flags.get(request.session_hash):
            flag.set()
            return "Stopped."
        return gr.skip()

    def forget_session(request: gr.Request) -> None:
        if flag := cancel_flags.get(request.session_hash):
            flag.set()
        shutil.rmtree(video_path(request).parent, ignore_errors=True)

    with gr.Blocks(title="EMO: Emote Portrait Alive", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(model_markdown(model_info), elem_id="model", container=True)
        with gr.Row(equal_height=False):
            with gr.Column():
                image = gr.Image(
                    label="Portrait", type="pil", sources=["upload", "webcam", "clipboard"], height=320
                )
                audio = gr.Audio(
                    label="Voice (speech or song)", type="filepath", sources=["upload", "microphone"]
                )
                estimate_text = gr.Markdown(NO_AUDIO_YET, elem_id="estimate")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", scale=3)
                    cancel_button = gr.Button("Cancel", variant="stop", scale=1)
                gr.Examples(
                    EXAMPLES, inputs=[image, audio], label="Example: click to use it", cache_examples=False
                )
                with gr.Accordion("Advanced", open=False):
                    preset = gr.Dropdown([MODEL_PRESET, *PRESETS], value=MODEL_PRESET, label="Speed preset",
                                         info=PRESET_INFO)  # fmt: skip
                    steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="Denoising steps per clip",
                                      info="EMO uses 40; fewer than 20 give artifacts.")  # fmt: skip
                    guidance = gr.Slider(1, 10, value=defaults.guidance_scale, step=0.5, label="Audio guidance",
                                         info="How strongly the face follows the voice (1 = off).")  # fmt: skip
                    head_speed = gr.Slider(0, 2, value=defaults.head_speed, step=0.05, label="Head speed",
                                           info="Degrees per frame: 0.1-1 for speech, 1-1.3 for singing.",
                                           visible=speed_layers)  # fmt: skip
                    region_weights = [
                        gr.Slider(0, 2, value=1.0, step=0.05, label=label, info=info, visible=region_audio)
                        for label, info in REGION_WEIGHT_SLIDERS
                    ]
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                        random_seed = gr.Checkbox(value=defaults.seed is None, label="Random seed")
                    paste_back = gr.Checkbox(
                        value=defaults.paste_back, label="Paste the face back into the whole photo"
                    )
                    max_length = gr.Slider(1, 300, value=defaults.max_duration, step=1, label="Max length (s)",
                                           info="Longer audio is refused.")  # fmt: skip
            with gr.Column():
                video = gr.Video(label="Video", format=None, height=420, buttons=["download"])
                result = gr.Markdown(label="Summary", elem_id="result")

        gr.on([audio.change, steps.change, max_length.change], show_estimate, [audio, steps, max_length],
              estimate_text, queue=False, show_progress="hidden", trigger_mode="always_last",
              api_visibility="private")  # fmt: skip
        # `input`, not `change`: only a person's choice moves the steps (a change event on mount, when the
        # accordion first opens, would reset steps already typed)
        preset.input(preset_steps, preset, steps, queue=False, show_progress="hidden",
                     api_visibility="private")  # fmt: skip
        controls = [steps, guidance, head_speed, seed, random_seed, paste_back, max_length, preset]
        generation = generate_button.click(
            run,
            [image, audio, *controls, *region_weights],
            [video, result],
            api_name="generate",
            show_progress_on=video,
            concurrency_limit=1,
        )
        cancel_button.click(stop, None, result, cancels=[generation], queue=False, api_name="cancel")
        demo.unload(forget_session)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo
