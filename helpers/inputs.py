"""The checks on a SegVLM's inputs (model.SegVLM.forward calls them; SegVLM.segment, the bare forward pass, does
not, so that it can be captured in a CUDA graph)."""
import torch


def check_inputs(image, tokens, image_index=None, input_size=416, word_len=22):
    """SegVLM.forward's inputs, checked before the model runs: a ValueError that says what was expected.

    image (B, 3, H, W) float with H, W multiples of 32; tokens (B, L) long with L <= word_len and no
    all-padding row; image_index None, or (B,) long indices into image's batch. input_size is only
    named in the message, as an example of a good size.
    """
    if not torch.is_tensor(image) or image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be a (B, 3, H, W) tensor, got shape {tuple(getattr(image, 'shape', ()))}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor normalised with CLIP's mean/std, got {image.dtype}")
    h, w = image.shape[-2:]
    if h % 32 or w % 32:
        raise ValueError(f"image height and width must be multiples of 32 (e.g. {input_size}), got {h}x{w}")
    if not torch.is_tensor(tokens) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a (B, L) tensor, got shape {tuple(getattr(tokens, 'shape', ()))}")
    if tokens.dtype != torch.long:
        raise ValueError(f"tokens must be torch.long (int64) ids from clip.tokenize, got {tokens.dtype}")
    if tokens.shape[1] > word_len:
        raise ValueError(f"tokens have length {tokens.shape[1]}, more than word_len={word_len}; "
                         f"tokenize with context_length={word_len}, truncate=True")
    # An all-padding row makes the decoder's attention NaN. Checking it reads the tokens, a
    # device-to-host sync on a GPU, so it runs only for tokens on the CPU (free there); tokens
    # from clip.tokenize / transforms.tokenize always hold the start and end tokens.
    if tokens.device.type == "cpu" and not (tokens != 0).any(dim=1).all():
        raise ValueError("a row of tokens is all padding (0); clip.tokenize gives every phrase start and end tokens")
    if image_index is None:
        if tokens.shape[0] != image.shape[0]:
            raise ValueError(f"image batch ({image.shape[0]}) and tokens batch ({tokens.shape[0]}) differ")
    elif (not torch.is_tensor(image_index) or image_index.dtype != torch.long
          or tuple(image_index.shape) != (tokens.shape[0],)):
        raise ValueError(f"image_index must be a ({tokens.shape[0]},) torch.long tensor (one image per phrase), "
                         f"got {getattr(image_index, 'dtype', type(image_index).__name__)} "
                         f"of shape {tuple(getattr(image_index, 'shape', ()))}")
    elif image_index.device.type == "cpu" and not (
            (image_index >= 0).all() and (image_index < image.shape[0]).all()):
        raise ValueError(f"image_index must lie in [0, {image.shape[0]}) (the images given), "
                         f"got {image_index.tolist()}")
