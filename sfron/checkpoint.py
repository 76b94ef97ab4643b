"""
DiT checkpoints in every form DiT users have, read without ever unpickling arbitrary objects: the released
weights by name (downloaded into pretrained_models/ on first use), a raw state dict, a DiT train.py checkpoint
{"model", "ema", "opt", "args"}, the checkpoints of this repository (which also record their settings), a
.safetensors state dict, and a diffusers DiT folder (a DiTPipeline or its transformer subfolder).
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import urllib.request

import torch

from .diffusers_io import read_diffusers_dit
from .files import (atomic_safetensors_save, atomic_write, file_sha256, read_safetensors, safe_torch_load,
                    strip_module_prefix)
from .utils import UserError

PRETRAINED_MODELS = {"DiT-XL-2-512x512.pt", "DiT-XL-2-256x256.pt"}
PRETRAINED_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
PRETRAINED_DIR = "pretrained_models"
RECORDED_KEYS = ("model", "image_size", "num_classes", "vae", "random_flip")
SAFETENSORS_SETTINGS_KEY = "dit_settings"  # metadata entry: the recorded settings as JSON


def find_checkpoint(source):
    """(state dict, recorded settings) of a checkpoint; the settings are what its "spec" or "args" entry
    records (image_size, num_classes, vae, random_flip), or {} for a raw state dict."""
    if source in PRETRAINED_MODELS and not os.path.isfile(source):
        return download_model(source), {}
    if os.path.isdir(source):
        return read_diffusers_dit(source)
    if source.endswith(".safetensors"):
        return read_safetensors_checkpoint(source)
    checkpoint = safe_torch_load(source, what="checkpoint")
    return state_dict_from_checkpoint(checkpoint, source), recorded_settings(checkpoint)


def read_safetensors_checkpoint(path):
    """(state dict, recorded settings) of a .safetensors state dict (settings from its metadata, if written here)."""
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise UserError(f"{path} holds no tensors")
    try:
        recorded = json.loads(metadata.get(SAFETENSORS_SETTINGS_KEY, "{}"))
    except ValueError:
        recorded = {}
    return strip_module_prefix(tensors), recorded_settings({"spec": recorded})


def checkpoint_sha256(ckpt):
    """The SHA-256 of a checkpoint's bytes: a file, a released name once downloaded, or every file of a diffusers
    folder in sorted order; None where nothing local holds it."""
    if ckpt in PRETRAINED_MODELS and not os.path.exists(ckpt):
        ckpt = os.path.join(PRETRAINED_DIR, ckpt)
    if os.path.isfile(ckpt):
        return file_sha256(ckpt)
    if os.path.isdir(ckpt):
        digest = hashlib.sha256()
        for root, _, files in sorted(os.walk(ckpt)):
            for name in sorted(files):
                digest.update(file_sha256(os.path.join(root, name)).encode())
        return digest.hexdigest()
    return None


def save_safetensors_weights(state_dict, path, settings):
    """The weights as one .safetensors file, with the settings find_checkpoint reads back in its metadata."""
    recorded = {k: settings[k] for k in RECORDED_KEYS if settings.get(k) is not None}
    atomic_safetensors_save(state_dict, path, {SAFETENSORS_SETTINGS_KEY: json.dumps(recorded)})


def recorded_settings(checkpoint):
    """The model settings a training or unlearning checkpoint records about itself."""
    if not isinstance(checkpoint, dict):
        return {}
    recorded = checkpoint.get("spec") or checkpoint.get("args") or {}
    if not isinstance(recorded, dict):  # DiT train.py stores an argparse.Namespace
        recorded = vars(recorded)
    return {k: recorded[k] for k in RECORDED_KEYS if recorded.get(k) is not None}


def official_unlearning_checkpoint(checkpoint):
    """Whether a checkpoint was written by the official SFR-on DiT forget.py: its "args" is the script's
    argparse.Namespace, which records the forget class."""
    return isinstance(checkpoint.get("args"), argparse.Namespace) and hasattr(checkpoint["args"], "forget_class")


def state_dict_from_checkpoint(checkpoint, source):
    """
    The model weights inside a loaded checkpoint object: "ema" preferred, as the official loader does, except in a
    checkpoint of the official forget.py, whose "ema" is an EMA of decay 0.9999 over the unlearning steps (after
    600 steps still 0.9999^600 = 94% the original model): there "model" holds the unlearned weights.
    """
    if not isinstance(checkpoint, dict):
        raise UserError(f"{source} is not a DiT checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    keys = ("ema", "model")  # train.py checkpoints: the EMA weights are the ones to sample from
    if official_unlearning_checkpoint(checkpoint) and isinstance(checkpoint.get("model"), dict):
        print(f"note: {source} was written by the official forget.py: reading its 'model' (the unlearned weights), "
              f"not its 'ema' (an EMA of decay 0.9999, mostly the original model)", file=sys.stderr)
        keys = ("model",)
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        keys = ", ".join(list(checkpoint)[:5])
        raise UserError(f"{source} is not a DiT checkpoint: expected a state dict of tensors, found keys {keys}")
    return strip_module_prefix(checkpoint)


def download_model(model_name):
    """Downloads a released DiT checkpoint into pretrained_models/ (once) and loads it."""
    if model_name not in PRETRAINED_MODELS:
        raise UserError(f"unknown released model {model_name}; choose from {sorted(PRETRAINED_MODELS)}")
    local_path = os.path.join(PRETRAINED_DIR, model_name)
    if not os.path.isfile(local_path):
        url = PRETRAINED_URL.format(model_name)
        print(f"Downloading {url} to {local_path}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                atomic_write(local_path, lambda f: shutil.copyfileobj(response, f, length=1 << 20))
        except OSError as e:
            raise UserError(f"could not download {url} ({e}); download it by hand and place it at "
                            f"{local_path}, or pass a local file to --ckpt") from None
    return state_dict_from_checkpoint(safe_torch_load(local_path, what="checkpoint"), local_path)


def load_model_weights(model, state_dict, source, model_desc="the model", assign=False, holds=None):
    """
    load_state_dict(strict=True) with one clear line naming what does not fit, instead of a traceback (holds: a
    function giving what the checkpoint holds, for that line). assign=True adopts the checkpoint's tensors (as
    float32), e.g. into a model built on the meta device.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        if wrong:
            k, got, want = wrong[0]
            detail = f"{k} has shape {got}, expected {want}"
        elif missing:
            detail = f"{len(missing)} weights missing (e.g. {missing[0]})"
        else:
            detail = f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})"
        about = f"; {holds()}" if holds is not None else " (another model size, image size, class count or VAE?)"
        raise UserError(f"checkpoint {source} does not fit {model_desc}: {detail}{about}")
    if assign:
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model
