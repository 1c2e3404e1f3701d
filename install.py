"""Run by ComfyUI-Manager after installing the pack. Idempotent, quiet, never pip-installs
(requirements.txt is for that): it only makes sure the model folder exists and that the
shipped default model is present and readable."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "models", "clip_rpn_default.safetensors")


def _comfy_models_dir():
    # custom_nodes/<pack>/ -> ComfyUI/models (only when installed in the usual place)
    root = os.path.dirname(os.path.dirname(HERE))
    models = os.path.join(root, "models")
    return models if os.path.isdir(models) else None


def main():
    models = _comfy_models_dir()
    if models:
        os.makedirs(os.path.join(models, "clip_rpn"), exist_ok=True)
    if not os.path.isfile(DEFAULT) or os.path.getsize(DEFAULT) < 1024:
        print(f"[CLIP-RPN] the shipped model {DEFAULT} is missing or incomplete "
              "(git-lfs not installed?); reinstall the pack", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
