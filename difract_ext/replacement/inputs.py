"""What the transformer receives at one denoising step of one prompt and seed.

:func:`capture_step_input` runs a ``FluxPipeline`` up to the chosen step and records the
transformer's keyword inputs there (and its output), which is all a local replacement model of
that step needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from difract_ext.flux.defaults import resolve


class _Stop(Exception):
    pass


@dataclass
class FluxStepInput:
    """The transformer call of one step (batch 1).

    Shapes: ``hidden_states [1, n_img, C_in]`` (packed latents x_t), ``encoder_hidden_states
    [1, n_txt, d_joint]``, ``pooled_projections [1, d_pool]``, ``timestep [1]`` (in [0, 1]),
    ``img_ids [n_img, 3]``, ``txt_ids [n_txt, 3]``, ``guidance [1]`` or None;
    ``output [1, n_img, C_out]`` the velocity the real transformer predicted.
    """

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor
    pooled_projections: torch.Tensor
    timestep: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: torch.Tensor | None = None
    output: torch.Tensor | None = None
    prompt: str = ""
    seed: int = 0
    step: int = 0
    num_inference_steps: int = 0
    height: int | None = None
    width: int | None = None
    text_tokens: list[str] = field(default_factory=list)
    images: Any = None  # the finished run's images (``capture_step_input(..., finish=True)``)

    @property
    def n_txt(self) -> int:
        return int(self.encoder_hidden_states.shape[1])

    @property
    def n_img(self) -> int:
        return int(self.hidden_states.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        """Image patches as ``(rows, cols)``, from the ``img_ids`` FLUX builds."""
        return int(self.img_ids[:, 1].max()) + 1, int(self.img_ids[:, 2].max()) + 1

    @property
    def t(self) -> float:
        return float(self.timestep.reshape(-1)[0])

    def transformer_kwargs(self) -> dict[str, Any]:
        return {
            "hidden_states": self.hidden_states,
            "encoder_hidden_states": self.encoder_hidden_states,
            "pooled_projections": self.pooled_projections,
            "timestep": self.timestep,
            "img_ids": self.img_ids,
            "txt_ids": self.txt_ids,
            "guidance": self.guidance,
        }


#: Label of a T5 padding position (FLUX attends to padding: it is part of the model's input).
PAD_LABEL = "<pad>"


def text_token_labels(pipeline: Any, prompt: str, max_sequence_length: int) -> list[str]:
    """The T5 tokens of ``prompt`` padded as ``FluxPipeline`` pads them (one label per position).

    Padding positions (attention mask 0) are labelled :data:`PAD_LABEL`, whatever the tokenizer
    calls its pad token, so graphs can tell them from real tokens.
    """
    tok = pipeline.tokenizer_2
    enc = tok(prompt, padding="max_length", max_length=max_sequence_length, truncation=True)
    labels = [t.replace("\u2581", "") or t for t in tok.convert_ids_to_tokens(enc["input_ids"])]
    return [lab if real else PAD_LABEL for lab, real in zip(labels, enc["attention_mask"])]


def is_padding_label(label: str) -> bool:
    """Whether a text token label (:func:`text_token_labels`) marks T5 padding."""
    return label == PAD_LABEL


@torch.no_grad()
def capture_step_input(
    pipeline: Any,
    prompt: str,
    step: int,
    seed: int = 0,
    num_inference_steps: int | None = None,
    finish: bool = False,
    **call: Any,
) -> FluxStepInput:
    """Run ``pipeline`` until denoising step ``step`` and return that transformer call.

    Args:
        pipeline: a ``FluxPipeline``.
        prompt: one prompt (graphs are per prompt and seed).
        step: 0-based step index, ``< num_inference_steps``.
        seed: generator seed, as in ``FluxModel.trace(seed=...)``.
        num_inference_steps: steps of the run (default: the pipeline's own).
        finish: run to the end and keep the decoded images (``output_type="np"``) in
            ``.images``; otherwise stop right after the captured step.
        **call: other pipeline arguments (``height``, ``width``, ``max_sequence_length``...);
            those not given are the pipeline's own (:func:`difract_ext.flux.defaults.resolve`:
            32 px and 16 tokens for the shapes model).

    Raises:
        ValueError: ``step`` out of range, or a batch of prompts.

    Warns:
        TrainedRangeWarning: a size or T5 length outside the range the pipeline was trained at.
    """
    if not isinstance(prompt, str):
        raise ValueError(
            "capture_step_input takes one prompt (a str); graphs are per prompt and seed"
        )
    call = resolve(pipeline, num_inference_steps=num_inference_steps, **call)
    num_inference_steps = int(call.pop("num_inference_steps"))
    if not 0 <= step < num_inference_steps:
        raise ValueError(
            f"step {step} out of range: the run has {num_inference_steps} steps "
            f"(0..{num_inference_steps - 1})"
        )
    tf = pipeline.transformer
    seen: dict[str, Any] = {"calls": 0}

    def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if seen["calls"] == step:
            seen["kwargs"] = {
                k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                for k, v in kwargs.items()
            }

    def post(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if seen["calls"] == step:
            seen["output"] = (out[0] if isinstance(out, tuple) else out.sample).detach().clone()
            if not finish:
                raise _Stop
        seen["calls"] += 1

    h1 = tf.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = tf.register_forward_hook(post, with_kwargs=True)
    result = None
    try:
        result = pipeline(
            prompt,
            num_inference_steps=num_inference_steps,
            output_type="np" if finish else "latent",
            generator=torch.Generator(pipeline.device).manual_seed(seed),
            **call,
        )
    except _Stop:
        pass
    finally:
        h1.remove()
        h2.remove()
    kw = seen["kwargs"]
    max_len = int(call.get("max_sequence_length", 512))
    return FluxStepInput(
        hidden_states=kw["hidden_states"],
        encoder_hidden_states=kw["encoder_hidden_states"],
        pooled_projections=kw["pooled_projections"],
        timestep=kw["timestep"],
        img_ids=kw["img_ids"],
        txt_ids=kw["txt_ids"],
        guidance=kw.get("guidance"),
        output=seen["output"],
        prompt=prompt,
        seed=seed,
        step=step,
        num_inference_steps=num_inference_steps,
        height=call.get("height"),
        width=call.get("width"),
        text_tokens=text_token_labels(pipeline, prompt, max_len),
        images=None if result is None else result.images,
    )
