"""The checks a state dict passes before a model takes it: every entry a dense floating tensor of the right
name and shape, and no NaN or infinity (helpers/checkpoints.py and helpers/runs.py call them)."""
import torch


def compare_state_dict(expected: dict, sd: dict) -> tuple:
    """(missing, unexpected, [(key, shape found, shape expected)]) of a state dict against the
    {name: shape} a model expects; a value that is not a tensor counts as of another shape."""
    missing = [k for k in expected if k not in sd]
    unexpected = [str(k) for k in sd if k not in expected]
    wrong = [(k, tuple(getattr(sd[k], "shape", ())), tuple(s)) for k, s in expected.items()
             if k in sd and not (torch.is_tensor(sd[k]) and tuple(sd[k].shape) == tuple(s))]
    return missing, unexpected, wrong


def state_dict_misfit(model, state_dict, show=3) -> str:
    """An empty string when state_dict fits model exactly, else a short summary: how many keys are
    missing, unexpected or of another shape, and the first `show` of each (not torch's full list)."""
    if not isinstance(state_dict, dict):
        return f"'model' is a {type(state_dict).__name__}, not a state dict"
    missing, unexpected, wrong = compare_state_dict({k: v.shape for k, v in model.state_dict().items()}, state_dict)
    shapes = [f"{k} {got} for {want}" for k, got, want in wrong]
    return "; ".join(f"{len(keys)} {what} (e.g. {', '.join(keys[:show])})" for what, keys in
                     (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys)


def check_tensors(state_dict, where, name=str) -> None:
    """A ValueError naming the first entry of `state_dict` that is not a dense tensor of the kind SegVLM keeps:
    not a tensor; sparse (torch would fail on it later, far from the file); a weight of an integer, boolean or
    complex type (SegVLM's weights are floating: integer values load as whole numbers, a CRIS weight
    truncated to 0). BatchNorm's counters (num_batches_tracked) are integers. name: how to show a key."""
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise ValueError(f"{where}: the entry {name(key)} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided:
            raise ValueError(f"{where}: the tensor {name(key)} is sparse ({value.layout}); the model's weights are "
                             "dense tensors")
        if not str(key).endswith("num_batches_tracked") and not value.is_floating_point():
            raise ValueError(f"{where}: the weight {name(key)} is of type {value.dtype}, expected a floating type "
                             f"(float32, float16 or bfloat16): its values would load as whole numbers")


def check_finite(state_dict, where, name=str) -> None:
    """A ValueError naming the first floating tensor of `state_dict` that holds a NaN or an infinity: such
    weights give a blank or full mask, or a score of 0, without any other sign. name: how to show a key."""
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not value.is_meta \
                and not bool(torch.isfinite(value).all()):  # a meta tensor (shapes only) holds no value
            raise ValueError(f"{where}: the weight {name(key)} holds NaN or infinite values (a damaged file, or a "
                             f"run whose training diverged); use another checkpoint")
