"""Speed presets: how many denoising steps, with which sampler, and on how many of them guidance runs.

- `quality`: EMO's setting, 40 DDIM steps, guidance on every step;
- `balanced`: DPM-Solver++ (2M), 20 steps, guidance on every step;
- `fast`: DPM-Solver++ (2M), 10 steps, guidance on the first half of the steps only (the late, low-noise
  steps refine detail; the audio has set the mouth by then), so the last steps run one branch, not two.

What each costs in quality is measured against `quality` on a trained model by `benchmarks/bench_presets.py`
(figures in benchmarks/RESULTS.md). The sampler is built from the model's own scheduler config, so the
model's noise schedule and prediction type (v-prediction, zero terminal SNR, trailing spacing) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

SAMPLERS = ("ddim", "dpmsolver++", "unipc")


@dataclass(frozen=True)
class Preset:
    name: str
    sampler: str
    num_inference_steps: int
    guidance_fraction: (
        float  # guidance on the first fraction of the steps; the rest run the conditional branch
    )
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("quality", "ddim", 40, 1.0, "40 DDIM steps, guidance on every step (EMO's setting)"),
        Preset("balanced", "dpmsolver++", 20, 1.0, "20 DPM-Solver++ steps, guidance on every step"),
        Preset("fast", "dpmsolver++", 10, 0.5, "10 DPM-Solver++ steps, guidance on the first 5"),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}") from None


def make_scheduler(
    sampler: str, base_config
) -> DDIMScheduler | DPMSolverMultistepScheduler | UniPCMultistepScheduler:
    """A sampler of the given kind with the model's noise schedule (betas, prediction type, spacing)."""
    config = dict(base_config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "dpmsolver++":
        # zero terminal SNR: the last step must go to sigma 0 (the default "zero" final sigma keeps it finite)
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
        )
    if sampler == "unipc":
        return UniPCMultistepScheduler.from_config(config, final_sigmas_type="zero")
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
