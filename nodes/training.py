"""Synthesize Rain (clean -> rainy pairs) and the loss-scheduled Fine-tune node."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from comfy_api.latest import io

from ..cliprpn_core import DEFAULT_MODEL_NAME, default_model_path, save_model
from ..cliprpn_core import node_names as N
from ..cliprpn_core.checkpoint import read_metadata
from ..cliprpn_core.finetune import check_pairs, finetune, rgb_only
from ..cliprpn_core.patterns import EXPERTS
from . import _host as H
from . import node_logic
from ._types import CATEGORY, CLIPRPNModel

log = logging.getLogger("CLIP-RPN")


class SynthesizeRain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=N.SYNTHESIZE_RAIN,
            display_name="Synthesize Rain",
            category=CATEGORY,
            description="Adds realistic, labelled synthetic rain to clean images: makes rainy/clean pairs for "
                        "Loss-scheduled Fine-tune, or test inputs. The same seed gives the same rain.",
            inputs=[
                io.Image.Input("image", tooltip="Clean images (whole batch)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                             tooltip="Random seed of the rain."),
                io.Combo.Input("regime", options=[node_logic.REGIME_RANDOM, *EXPERTS], default=node_logic.REGIME_RANDOM,
                               tooltip="Kind of rain: random per image, or one regime for all."),
            ],
            outputs=[
                io.Image.Output("rainy", tooltip="The images with rain added."),
                io.Mask.Output("rain_mask", tooltip="Where the rain hides the background (1 = rain)."),
            ],
        )

    @classmethod
    def execute(cls, image, seed=0, regime=node_logic.REGIME_RANDOM) -> io.NodeOutput:
        x = node_logic.bhwc_to_bchw(image, "image")
        if not torch.isfinite(x).all():
            raise ValueError("image contains NaN or Inf values")
        rainy, mask = node_logic.synthesize_rain(x.cpu(), seed, regime)
        return io.NodeOutput(H.output(node_logic.bchw_to_bhwc(rainy)), H.output(mask[:, 0]))


class LossScheduledFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=N.FINETUNE,
            display_name="Loss-scheduled Fine-tune",
            category=CATEGORY,
            description="Fine-tunes a copy of the model on rainy/clean image pairs with a loss schedule "
                        "(Charbonnier, SSIM/edge/FFT mix, curriculum, DWA or uncertainty weighting). The loaded "
                        "model is not changed. With a save name the result is written to models/clip_rpn "
                        "(atomically; nothing is written when cancelled).",
            inputs=[
                CLIPRPNModel.Input("model", tooltip="From CLIP-RPN Loader; a copy is fine-tuned."),
                io.Image.Input("rainy", tooltip="Rainy images."),
                io.Image.Input("clean", tooltip="The clean image for each rainy image (same count and size)."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimisation steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-2, step=1e-6, round=1e-7,
                               tooltip="AdamW learning rate (cosine decay to 10 %)."),
                io.Combo.Input("schedule", options=list(node_logic.SCHEDULES), default="mix",
                               tooltip="Loss schedule: charbonnier only; mix (Charbonnier+SSIM+edge+FFT); "
                                       "curriculum (pixel then structure); dwa (dynamic weight averaging); "
                                       "uncertainty (learned weights); equal_mix (uncertainty's starting weights, fixed); "
                                       "psnr (the PSNR loss alone); psnr_mix / psnr_dwa "
                                       "(the mix with the PSNR loss in place of Charbonnier, fixed / dynamic); "
                                       "psnr_equal / psnr_uncertainty (equal_mix / uncertainty with the PSNR loss)."),
                io.Int.Input("patch_size", default=128, min=16, max=1024, step=8, advanced=True,
                             tooltip="Random crops of this size are trained on."),
                io.Int.Input("batch_size", default=4, min=1, max=64, advanced=True, tooltip="Crops per step."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Seed of crops and flips."),
                io.String.Input("save_name", default="",
                                tooltip="If set, the fine-tuned model is saved as models/clip_rpn/<name>.safetensors "
                                        "(letters, digits, '.', '_', '-'). Empty: not saved."),
            ],
            outputs=[
                CLIPRPNModel.Output("model", tooltip="The fine-tuned model (the input model is unchanged)."),
                io.Image.Output("loss_curve", tooltip="Loss per step."),
                io.String.Output("report", tooltip="Final losses and where the model was saved."),
            ],
        )

    @classmethod
    def validate_inputs(cls, save_name=""):
        try:
            node_logic.check_save_name(save_name, (Path(DEFAULT_MODEL_NAME).stem,))
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, rainy, clean, steps=200, learning_rate=1e-4, schedule="mix", patch_size=128,
                batch_size=4, seed=0, save_name="") -> io.NodeOutput:
        name = node_logic.check_save_name(save_name, (Path(DEFAULT_MODEL_NAME).stem,))
        dest = None
        if name:
            dest = H.save_dir() / f"{name}.safetensors"
            if dest.resolve() == default_model_path().resolve():
                raise ValueError("refusing to overwrite the shipped default model")
            node_logic.check_overwrite(dest, read_metadata)  # checked before training, and again before saving
        r, c = node_logic.bhwc_to_bchw(rainy, "rainy"), node_logic.bhwc_to_bchw(clean, "clean")
        check_pairs(rgb_only(r), rgb_only(c))
        device = H.load_to_device(model) if model.patcher is not None else torch.device("cpu")
        bar = H.Progress(steps)
        perceive = None
        if model.perceiver is not None:
            from .processing import derainer
            d = derainer(model)
            perceive = lambda x: d.perceive(x)[0]  # noqa: E731
        H.check_cancel()
        res = finetune(model.model, r, c, steps=steps, lr=learning_rate, schedule=schedule, patch=patch_size,
                       batch_size=batch_size, seed=seed, device=device, on_step=bar, perceive=perceive,
                       preview=bar.offer)
        last = {k: v[-1] for k, v in res.history.items() if v}
        report = f"fine-tuned {model.name} for {steps} steps ({schedule}); final " + \
                 ", ".join(f"{k}={v:.4g}" for k, v in last.items())
        H.check_cancel()  # a Cancel that arrived during the last step still writes nothing
        if dest is not None:
            if node_logic.check_overwrite(dest, read_metadata):
                log.info("CLIP-RPN: replacing the earlier fine-tune %s", dest)
            save_model(res.model, dest, extra_meta={"finetuned_from": model.name, "steps": steps,
                                                    "schedule": schedule, "learning_rate": learning_rate})
            report += f"; saved to {dest}"
            log.info("CLIP-RPN: saved fine-tuned model to %s", dest)
        # hand the copy to ComfyUI where it keeps idle models; load_models_gpu moves it when used
        offload = model.patcher.offload_device if model.patcher is not None else torch.device("cpu")
        net = res.model.to(offload, model.dtype)
        out = node_logic.ModelHandle(net, model.perceiver, model.dtype, name=name or f"{model.name} (fine-tuned)",
                              clip_name=model.clip_name, module=torch.nn.ModuleDict({"rpn": net}))
        if model.patcher is not None:
            out.patcher = type(model.patcher)(out.module, load_device=model.patcher.load_device,
                                              offload_device=model.patcher.offload_device)
        return io.NodeOutput(out, H.output(node_logic.loss_chart(res.history, f"fine-tune loss ({schedule})")), report)


NODES = [SynthesizeRain, LossScheduledFinetune]
