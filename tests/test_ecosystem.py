"""diffusers in and out, safetensors checkpoints: a tiny latent DiT with a tiny local VAE, no network."""
import json
import os
import shutil

import pytest
import torch

from helpers import make_checkpoint, make_vae_folder, run_in_process, run_script
from sfron.build import ModelRequest, load_model_and_vae
from sfron.checkpoint import find_checkpoint, save_safetensors_weights
from sfron.diffusers_io import export_pipeline, read_class_names, use_official_timestep_frequencies
from sfron.utils import UserError

NAMES = ["tabby cat", "golden retriever", "tench"]


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    """A DiT-T/2 on 8x8 latents (64x64 images) of 3 classes, its tiny VAE, and the exported pipeline folder."""
    root = tmp_path_factory.mktemp("eco")
    ckpt = make_checkpoint(str(root / "dit.pt"), input_size=8, in_channels=4, num_classes=3, scale=0.1)
    vae = make_vae_folder(str(root / "vae"))
    loaded = load_model_and_vae(ModelRequest(model="DiT-T/2", ckpt=ckpt, vae=vae), torch.device("cpu"))
    export_pipeline(loaded, NAMES, str(root / "pipe"))
    return loaded, str(root / "pipe"), root


def test_exported_pipeline_loads_and_matches_the_official_forward(latent_model):
    from diffusers import DiTPipeline
    loaded, pipe_dir, _ = latent_model
    pipe = DiTPipeline.from_pretrained(pipe_dir)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([0, 2, 3])  # 3: the null label
    with torch.no_grad():
        ours = loaded.model.eval()(x, t, y)
        stock = pipe.transformer(x, t, y).sample
        official = use_official_timestep_frequencies(pipe.transformer)(x, t, y).sample
    assert (official - ours).abs().max().item() < 1e-5
    # diffusers' own timestep frequencies (10000^(-i/127)) give another output: the README's caveat is real
    assert (stock - ours).abs().max().item() > 1e-3
    ids = pipe.get_label_ids(["golden retriever", "tench"])
    assert ids == [1, 2]
    # guidance feeds label 1000 as the null label: the padded table must hold the model's null row there
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert torch.equal(table[1000], loaded.model.y_embedder.embedding_table.weight[3])
    images = pipe(class_labels=ids, num_inference_steps=3, guidance_scale=4.0, output_type="np",
                  generator=torch.manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and float(images.std()) > 0


def test_diffusers_folder_reads_back_bit_identical(latent_model, tmp_path):
    loaded, pipe_dir, _ = latent_model
    original = find_checkpoint(loaded.ckpt)[0]
    for source in (pipe_dir, os.path.join(pipe_dir, "transformer")):
        state_dict, recorded = find_checkpoint(source)
        assert state_dict.keys() == original.keys()
        assert all(torch.equal(state_dict[k], original[k]) for k in original)
        assert recorded["num_classes"] == 3 and recorded["image_size"] == 64
    assert recorded["vae"] == os.path.join(pipe_dir, "vae")
    # the published DiT pipelines name the older class: Transformer2DModel with adaLN-Zero norms, same weights
    legacy = shutil.copytree(os.path.join(pipe_dir, "transformer"), tmp_path / "legacy")
    config = json.load(open(legacy / "config.json"))
    with open(legacy / "config.json", "w") as f:
        json.dump(dict(config, _class_name="Transformer2DModel", norm_type="ada_norm_zero"), f)
    assert all(torch.equal(find_checkpoint(str(legacy))[0][k], v) for k, v in original.items())
    with open(legacy / "config.json", "w") as f:
        json.dump(dict(config, _class_name="UNet2DModel"), f)
    with pytest.raises(UserError, match="describes a UNet2DModel"):
        find_checkpoint(str(legacy))
    # a folder with its VAE loads with no other flag
    again = load_model_and_vae(ModelRequest(model="DiT-T/2", ckpt=pipe_dir), torch.device("cpu"))
    assert again.spec.num_classes == 3 and again.spec.image_size == 64


def test_safetensors_checkpoint_round_trip_and_wrong_size(latent_model, tmp_path):
    loaded, _, _ = latent_model
    path = str(tmp_path / "w.safetensors")
    save_safetensors_weights(loaded.model.state_dict(), path, {"vae": "none", "num_classes": 3, "image_size": 8})
    state_dict, recorded = find_checkpoint(path)
    assert all(torch.equal(state_dict[k], v) for k, v in loaded.model.state_dict().items())
    assert recorded == {"vae": "none", "num_classes": 3, "image_size": 8}
    with pytest.raises(UserError, match="does not fit DiT-S/2"):
        load_model_and_vae(ModelRequest(model="DiT-S/2", ckpt=path, vae="none"), torch.device("cpu"))
    proc = run_in_process("sample.py", "--model", "DiT-S/2", "--ckpt", path, "--num-sampling-steps", 2,
                          "--out", tmp_path / "x.png", cwd=str(tmp_path))  # through a script: one line
    assert proc.returncode == 1 and proc.stderr.startswith("error: checkpoint") and "does not fit DiT-S/2" in \
        proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.safetensors").write_text("not a safetensors file")
    with pytest.raises(UserError, match="not a readable .safetensors"):
        find_checkpoint(str(tmp_path / "bad.safetensors"))


def test_class_names_and_bad_exports(latent_model, tmp_path):
    loaded, pipe_dir, root = latent_model
    names_file = tmp_path / "names.txt"
    names_file.write_text("a\nb\nc\n")
    assert read_class_names(str(names_file), None, 3) == ["a", "b", "c"]
    (tmp_path / "names.json").write_text(json.dumps({"1": "b", "0": "a", "2": "c"}))
    assert read_class_names(str(tmp_path / "names.json"), None, 3) == ["a", "b", "c"]
    assert read_class_names(None, None, 1000)[207] == "golden retriever"
    with pytest.raises(UserError, match="3 class names for a model of 4 classes"):
        read_class_names(str(names_file), None, 4)
    with pytest.raises(UserError, match="exists"):
        export_pipeline(loaded, NAMES, pipe_dir)
    pixel = make_checkpoint(str(tmp_path / "pixel.pt"), input_size=8, in_channels=3, num_classes=3)
    proc = run_script("export_diffusers.py", "--model", "DiT-T/2", "--ckpt", pixel, "--out", tmp_path / "p",
                      cwd=str(tmp_path), check=False)
    assert proc.returncode != 0 and "latent-space models only" in proc.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "p") and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
