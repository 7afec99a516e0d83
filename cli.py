"""The command-line plumbing shared by train.py, sample.py and bench.py: what "auto" means for the device and
the dtype, and the autocast context of a dtype."""
import contextlib

import torch


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type or invalid value (each script's main() prints it as one
    line). sample.py's SampleError and bench.py's BenchError are kinds of it."""


def resolve_device(name="auto", error=ConfigError):
    """The torch.device of --device: "auto" is cuda if available, else cpu. A device string torch does not
    parse, or a CUDA device this machine lacks, raises `error` (one line)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise error(f"--device={name!r} is not a device ({str(e).splitlines()[0]}); use auto, cpu, cuda, "
                    f"cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"--device={name} but CUDA is not available here; use --device=cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error(f"--device={name} but there are {torch.cuda.device_count()} CUDA device(s); "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name, device, error=ConfigError):
    """The dtype name of --dtype on `device`: "auto" is bfloat16 on a CUDA device that supports it, else
    float32. float16 needs CUDA (it trains with a GradScaler). Which names a script accepts is its own check."""
    device = torch.device(device)
    if name == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "float16" and device.type != "cuda":
        raise error("dtype float16 needs a CUDA device (use bfloat16 or float32)")
    return name


def autocast_for(device, dtype):
    """The context every forward runs in: autocast for the half precisions (the weights stay float32; the
    Miras memory computes in float32 inside it), nothing for float32 / float64."""
    if dtype in ("bfloat16", "float16"):
        return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def allow_tf32(device):
    """TF32 matmuls and convolutions on a CUDA device (float32 math on tensor cores)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
