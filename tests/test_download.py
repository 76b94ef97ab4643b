"""Checkpoint loading: every form DiT users have, never unpickling code, clear errors."""
import argparse
import os
import subprocess
import sys
import urllib.request

import pytest
import torch

import download
from download import find_model, load_model_weights
from models import DiT_models
from sfron.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_state(**kw):
    torch.manual_seed(0)
    return DiT_models["DiT-T/2"](input_size=8, in_channels=3, num_classes=4, **kw).state_dict()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_raw_state_dict(tmp_path):
    sd = tiny_state()
    torch.save(sd, tmp_path / "raw.pt")
    assert same(find_model(str(tmp_path / "raw.pt")), sd)


def test_train_checkpoint_prefers_ema(tmp_path):
    sd, ema = tiny_state(), {k: v + 1 for k, v in tiny_state().items()}
    torch.save({"model": sd, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-T/2", image_size=8)}, tmp_path / "train.pt")
    assert same(find_model(str(tmp_path / "train.pt")), ema)


def test_model_only_and_module_prefix(tmp_path):
    sd = tiny_state()
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "args": {"lr": 1e-4}}, tmp_path / "ddp.pt")
    assert same(find_model(str(tmp_path / "ddp.pt")), sd)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Exploit()
    evil.marker = str(marker)
    torch.save({"model": tiny_state(), "payload": evil}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load"):
        find_model(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    torch.save(tiny_state(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name in ("cut.pt", "text.pt", "list.pt", "missing.pt"):
        with pytest.raises(UserError) as err:
            find_model(str(tmp_path / name))
        assert name in str(err.value) and "\n" not in str(err.value)


def test_wrong_model_size_is_one_clear_line(tmp_path):
    small = DiT_models["DiT-S/2"](input_size=32, num_classes=1000).state_dict()
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    with pytest.raises(UserError) as err:
        load_model_weights(xl, small, "s2.pt", "DiT-XL/2")
    assert "does not fit DiT-XL/2" in str(err.value) and "\n" not in str(err.value)


def test_wrong_model_size_from_the_command_line(tmp_path):
    torch.save(DiT_models["DiT-S/2"](input_size=32, num_classes=1000).state_dict(), tmp_path / "s2.pt")
    (tmp_path / "data" / "train" / "n01440764").mkdir(parents=True)  # ImageNet class 0
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "generate_fisher.py"), "--model", "DiT-XL/2",
                           "--data-path", str(tmp_path / "data"), "--ckpt", str(tmp_path / "s2.pt"), "--vae", "none",
                           "--image-size", "32", "--forget-class", "0", "--results-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint") and "DiT-XL/2" in lines[0], proc.stderr
    assert "it holds DiT-S/2, input size 32, input channels 4, classes 1000" in lines[0], lines[0]


def test_released_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="pretrained_models/DiT-XL-2-256x256.pt"):
        find_model("DiT-XL-2-256x256.pt")
    assert not (tmp_path / "pretrained_models" / "DiT-XL-2-256x256.pt").exists()


def test_released_name_uses_the_local_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("pretrained_models")
    torch.save(tiny_state(), "pretrained_models/DiT-XL-2-512x512.pt")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download expected"))
    assert same(download.find_model("DiT-XL-2-512x512.pt"), tiny_state())
