"""
Files that survive a crash and files that cannot run code: every write goes to a temporary file beside its
target and is renamed over it (readers see the old file or the whole new one), and torch files are loaded
with weights_only=True (no arbitrary unpickling).
"""
import argparse
import hashlib
import json
import os
import pickle
import tempfile

import torch

from .utils import UserError, first_line

TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: .<name>.<random>.tmp beside the target
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write_fn, durable=True):
    """
    Calls write_fn(file object) on a temporary file beside `path`, then renames it over `path`: readers see the
    old file or the whole new one, never a part. durable=False skips the fsync (for many small files).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as raw:
            f = _WriteRecorder(raw)
            write_fn(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        failure = e if isinstance(e, OSError) else getattr(f, "error", None)
        if failure is not None:  # a full disk, a read-only or missing folder, a file-size limit
            raise UserError(f"cannot write {path} ({first_line(failure)}); the previous file there is "
                            f"unchanged") from None
        raise


class _WriteRecorder:
    """A file object that remembers its first failed write: torch.save reports one only as a position mismatch."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def remove_stale_temporaries(folder, of=None):
    """Removes the temporary files atomic_write left in `folder` when its process was killed mid-write: all of them,
    or with `of` only those of the file of that name (call it only where no other process writes them)."""
    prefix = f".{of}." if of is not None else "."
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(TEMP_SUFFIX):
                os.remove(os.path.join(folder, name))


def as_read_back(value):
    """A JSON-able value as json.load gives it back (tuples become lists): what a recorded copy compares equal to."""
    return json.loads(json.dumps(value))


def atomic_torch_save(obj, path):
    """torch.save that never leaves a half-written file at `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_dump(obj, path):
    """Writes obj as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def atomic_write_text(text, path):
    """Writes a text file, atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save_figure(fig, path):
    """Saves a matplotlib figure as PNG (tight layout), atomically, and closes it."""
    import io

    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def atomic_save_image(image, path, durable=True):
    """Saves a PIL image as PNG, atomically."""
    atomic_write(path, lambda f: image.save(f, format="PNG"), durable)


def safe_torch_load(path, what="file"):
    """
    Loads a torch file without unpickling arbitrary objects (weights_only=True; argparse.Namespace is allowed
    because DiT train.py checkpoints store their args in one). Any failure is a UserError naming the file.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain containers "
                        f"({first_line(e)})") from None
    except Exception as e:  # a truncated archive, a text file, an old non-zip pickle ...
        raise UserError(f"{path} is not a readable torch {what} ({type(e).__name__}: {first_line(e)})") from None


def atomic_safetensors_save(tensors, path, metadata=None):
    """Writes a .safetensors file (metadata: str -> str), atomically."""
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # no shared storage
    atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))


def read_safetensors(path):
    """(tensors, metadata) of a .safetensors file; one error line when it is not one."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise UserError(f"safetensors file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .safetensors file ({first_line(e)})") from None


def file_sha256(path):
    """The SHA-256 of a file's bytes (hex), read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def strip_module_prefix(state_dict):
    """Drops the 'module.' prefix that DataParallel/DDP put on every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)
