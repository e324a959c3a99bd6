"""CLIP's weights for model.build_model: by name through clip.load (downloads when online) or from a local file
(OpenAI's TorchScript .pt, or a plain state dict read with weights_only=True), and CLIP's sizes read from them.

It is also where the project imports `clip` (`from helpers.clip_weights import clip`): clip's own module runs
`from pkg_resources import packaging`, and setuptools warns (a UserWarning, "pkg_resources is deprecated as an
API") on that import, so every tool would open with two lines that are neither its own nor anything a user can
act on. That one warning is silenced around that one import; every other warning, clip's later ones included,
is shown as Python shows it.
"""
import os
import warnings

import torch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import clip


def load_clip_state_dict(clip_weights) -> dict:
    """A float32 CLIP state dict from a model name or a file, with keys the backbone does not have removed."""
    name = clip_weights if clip_weights in clip.available_models() else "RN101"
    help_msg = (f"could not load CLIP weights {clip_weights!r}. Get them on a machine with internet with "
                f"`python -c \"import clip; clip.load('{name}', jit=False)\"` (saved to ~/.cache/clip/{name}.pt), "
                f"copy that file here and pass its path as clip_weights; or pass clip_weights=None to train "
                f"from scratch with random weights.")
    try:
        if os.path.isfile(str(clip_weights)):
            try:
                with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI's files are TorchScript
                    warnings.simplefilter("ignore", FutureWarning)
                    sd = torch.jit.load(clip_weights, map_location="cpu").state_dict()  # OpenAI's archive
            except RuntimeError:
                sd = torch.load(clip_weights, map_location="cpu", weights_only=True)  # a plain state dict
        elif clip_weights in clip.available_models():
            sd = clip.load(clip_weights, device="cpu", jit=False)[0].state_dict()
        else:
            raise FileNotFoundError(f"no such file, and not one of CLIP's names {clip.available_models()}")
    except Exception as e:  # a failed download, a missing or unreadable file: one message says what to do
        raise RuntimeError(f"{help_msg} ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or "visual.attnpool.positional_embedding" not in sd:
        raise ValueError(f"{clip_weights!r} is not a CLIP ResNet state dict (SegVLM needs a ResNet CLIP, e.g. RN101)")
    drop = ("logit_scale", "input_resolution", "context_length", "vocab_size")
    return {k: v.float() for k, v in sd.items() if k not in drop}


def clip_fields_from_state_dict(sd: dict) -> dict:
    """CLIP's architecture, read from the shapes of its weights."""
    layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{i}.")}) for i in range(1, 5))
    grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return dict(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=grid * 32,
        vision_layers=layers,
        vision_width=sd["visual.layer1.0.conv1.weight"].shape[0],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=sd["ln_final.weight"].shape[0],
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )
