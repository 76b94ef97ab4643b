"""
DiT weights in diffusers' layout, both ways: the official state dict to a DiTPipeline folder (transformer as
safetensors, a DDIM scheduler with the DiT betas, the VAE, id2label) and a diffusers DiT folder back to the
official keys, bit for bit.

Two differences of diffusers' DiT from the official code, measured on the same weights:
- its timestep embedding uses the frequencies 10000^(-i/127) where the official DiT uses 10000^(-i/128)
  (diffusers' `Timesteps(..., downscale_freq_shift=1)` inside `CombinedTimestepLabelEmbeddings`), so its output
  is not the official one; `use_official_timestep_frequencies` makes it so;
- DiTPipeline guides all latent channels (the official sampler the first three) and always feeds label 1000 as the
  null label, so a model with fewer classes is exported with its label table padded to 1001 rows.
"""
import json
import os

import torch

from models import get_2d_sincos_pos_embed

from .files import read_safetensors, safe_torch_load
from .utils import UserError

TRANSFORMER_CLASS = "DiTTransformer2DModel"
# the published DiT pipelines predate that class: their config names Transformer2DModel with adaLN-Zero norms
LEGACY_CLASS = "Transformer2DModel"
PIPELINE_NULL_LABEL = 1000   # the null label DiTPipeline feeds for guidance, whatever the model's class count
CLASS_COUNT_KEY = "_dit_num_classes"  # in config.json: the real class count of a padded label table
PER_BLOCK_EMBEDDERS = (  # official key -> the copy every diffusers block holds under norm1.emb
    ("t_embedder.mlp.0.weight", "norm1.emb.timestep_embedder.linear_1.weight"),
    ("t_embedder.mlp.0.bias", "norm1.emb.timestep_embedder.linear_1.bias"),
    ("t_embedder.mlp.2.weight", "norm1.emb.timestep_embedder.linear_2.weight"),
    ("t_embedder.mlp.2.bias", "norm1.emb.timestep_embedder.linear_2.bias"),
    ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight"),
)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def one_to_one_keys(depth):
    """[(official key, diffusers key)] of the weights that map one to one (qkv and the embedders aside)."""
    modules = [("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
               ("final_layer.linear", "proj_out_2")]
    for i in range(depth):
        o, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        modules += [(o + "attn.proj", d + "attn1.to_out.0"), (o + "mlp.fc1", d + "ff.net.0.proj"),
                    (o + "mlp.fc2", d + "ff.net.2"), (o + "adaLN_modulation.1", d + "norm1.linear")]
    return [(f"{a}.{p}", f"{b}.{p}") for a, b in modules for p in ("weight", "bias")]


def block_count(state_dict, prefix):
    """How many transformer blocks a state dict holds (keys '<prefix><i>.')."""
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def padded_label_table(table, num_classes):
    """The label table (num_classes + 1, D) padded to DiTPipeline's 1001 rows: the null row last and in between."""
    if num_classes > PIPELINE_NULL_LABEL:
        raise UserError(f"DiTPipeline takes label {PIPELINE_NULL_LABEL} as the null label; a model with "
                        f"{num_classes} classes cannot run in it")
    null = table[num_classes:num_classes + 1]
    return torch.cat([table[:num_classes], null.expand(PIPELINE_NULL_LABEL + 1 - num_classes, -1)])


def official_to_diffusers(state_dict, num_classes):
    """diffusers DiTTransformer2DModel weights from an official DiT state dict with a null label row."""
    depth = block_count(state_dict, "blocks.")
    if state_dict["y_embedder.embedding_table.weight"].shape[0] != num_classes + 1:
        raise UserError("the model has no null label (trained without label dropout); DiTPipeline needs one for "
                        "guidance")
    out = {d: state_dict[o] for o, d in one_to_one_keys(depth)}
    embedders = dict(state_dict)
    embedders["y_embedder.embedding_table.weight"] = padded_label_table(
        state_dict["y_embedder.embedding_table.weight"], num_classes)
    for i in range(depth):
        d = f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            q, k, v = state_dict[f"blocks.{i}.attn.qkv.{p}"].chunk(3)
            out.update({f"{d}attn1.to_q.{p}": q, f"{d}attn1.to_k.{p}": k, f"{d}attn1.to_v.{p}": v})
        for official, copy in PER_BLOCK_EMBEDDERS:
            out[d + copy] = embedders[official]
    return {k: v.contiguous().clone() for k, v in out.items()}


def diffusers_to_official(weights, config, source):
    """The official DiT state dict of diffusers DiTTransformer2DModel weights and their config."""
    depth = block_count(weights, "transformer_blocks.")
    try:
        out = {o: weights[d] for o, d in one_to_one_keys(depth)}
        for i in range(depth):
            d = f"transformer_blocks.{i}.attn1."
            for p in ("weight", "bias"):
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([weights[f"{d}to_{x}.{p}"] for x in "qkv"])
        for official, copy in PER_BLOCK_EMBEDDERS:
            copies = [weights[f"transformer_blocks.{i}.{copy}"] for i in range(depth)]
            if any(not torch.equal(c, copies[0]) for c in copies[1:]):
                raise UserError(f"{source}: the blocks hold different {copy} weights, which one official DiT "
                                f"cannot represent")
            out[official] = copies[0]
    except KeyError as e:
        raise UserError(f"{source} is not a DiT transformer in diffusers' layout: no weight {e}") from None
    num_classes = config.get(CLASS_COUNT_KEY, config["num_embeds_ada_norm"])
    table = out["y_embedder.embedding_table.weight"]
    out["y_embedder.embedding_table.weight"] = torch.cat([table[:num_classes], table[-1:]]).clone()
    hidden = out["x_embedder.proj.weight"].shape[0]
    grid = config["sample_size"] // config["patch_size"]
    out["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).float().unsqueeze(0)
    return out


def transformer_config(model, num_classes):
    """The DiTTransformer2DModel config of an official DiT module (its LayerNorms have eps 1e-6)."""
    hidden = model.pos_embed.shape[-1]
    return {"num_attention_heads": model.num_heads, "attention_head_dim": hidden // model.num_heads,
            "in_channels": model.in_channels, "out_channels": model.out_channels, "num_layers": len(model.blocks),
            "sample_size": model.input_size, "patch_size": model.patch_size,
            "num_embeds_ada_norm": max(num_classes, PIPELINE_NULL_LABEL), "norm_eps": 1e-6}


def transformer_folder(path):
    """The transformer folder of a DiTPipeline folder (or the path itself), and the pipeline folder or None."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return os.path.join(path, "transformer"), path
    parent = os.path.dirname(os.path.abspath(path))
    return path, parent if os.path.isfile(os.path.join(parent, "model_index.json")) else None


def read_transformer_weights(folder):
    """The tensors of a diffusers model folder (safetensors preferred, a .bin read without unpickling code)."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_safetensors(path)[0] if name.endswith(".safetensors") else safe_torch_load(path, "weights")
    raise UserError(f"{folder} has none of {', '.join(WEIGHT_FILES)}")


def read_diffusers_dit(path):
    """
    (official state dict, recorded settings) of a diffusers DiT: a DiTPipeline folder or its transformer
    subfolder. The settings are the image size (latent size x 8), the class count and the pipeline's VAE folder.
    """
    folder, pipeline = transformer_folder(path)
    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a diffusers DiT folder: cannot read {config_path} ({e})") from None
    name = config.get("_class_name")
    if name != TRANSFORMER_CLASS and not (name == LEGACY_CLASS and config.get("norm_type") == "ada_norm_zero"):
        raise UserError(f"{path}: {config_path} describes a {name}, not a {TRANSFORMER_CLASS}")
    state_dict = diffusers_to_official(read_transformer_weights(folder), config, path)
    recorded = {"num_classes": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1}
    if config.get("in_channels") != 3:  # a latent model: the image is 8 times its latent
        recorded["image_size"] = config["sample_size"] * 8
    if pipeline and os.path.isdir(os.path.join(pipeline, "vae")):
        recorded["vae"] = os.path.join(pipeline, "vae")
    return state_dict, recorded


def use_official_timestep_frequencies(transformer):
    """Makes a diffusers DiTTransformer2DModel embed timesteps as the official DiT does (see the module text)."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def read_class_names(names_file, data_path, num_classes):
    """
    One name per class: from a file (a JSON list or {index: name}, or one name per line), else the class folder
    names of an ImageNet-style --data-path, else torchvision's ImageNet names for 1000 classes, else the indices.
    """
    if names_file:
        try:
            with open(names_file) as f:
                text = f.read()
        except OSError as e:
            raise UserError(f"--class-names {names_file}: {e.strerror}") from None
        try:
            parsed = json.loads(text)
            names = [parsed[k] for k in sorted(parsed, key=int)] if isinstance(parsed, dict) else parsed
        except ValueError:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    elif data_path:
        from .data import find_class_folders
        names = find_class_folders(data_path)[1]
    elif num_classes == 1000:
        from torchvision.models import ResNet50_Weights
        names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    else:
        names = [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise UserError(f"{len(names)} class names for a model of {num_classes} classes")
    return [str(n) for n in names]


def ddim_scheduler():
    """diffusers' DDIM with the DiT diffusion: linear betas 1e-4..0.02 over 1000 steps, 'ddimN' timesteps."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")


def export_pipeline(loaded, class_names, out_dir):
    """
    Writes a DiTPipeline folder of a LoadedModel (DiT, VAE, spec) to out_dir, which must not exist yet: it is
    built in a temporary folder beside it and renamed, so a crash leaves no half-written pipeline.
    """
    import shutil
    import tempfile

    from diffusers import DiTPipeline, DiTTransformer2DModel
    model, vae, spec = loaded.model, loaded.vae, loaded.spec
    if vae is None:
        raise UserError(f"{spec.describe()}: DiTPipeline runs latent-space models only (it decodes with a VAE)")
    if os.path.exists(out_dir):
        raise UserError(f"--out {out_dir} exists; give a new folder")
    config = transformer_config(model, spec.num_classes)
    with torch.device("meta"):
        transformer = DiTTransformer2DModel(**config)
    weights = official_to_diffusers({k: v.detach().cpu() for k, v in model.state_dict().items()}, spec.num_classes)
    transformer.load_state_dict(weights, strict=True, assign=True)
    vae = vae.to("cpu", memory_format=torch.contiguous_format)
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=ddim_scheduler())
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp")
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        add_to_json(os.path.join(tmp, "model_index.json"), {"id2label": dict(enumerate(class_names))})
        add_to_json(os.path.join(tmp, "transformer", "config.json"), {CLASS_COUNT_KEY: spec.num_classes})
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def add_to_json(path, entries):
    """Adds entries to a JSON object file."""
    with open(path) as f:
        content = json.load(f)
    content.update(entries)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
