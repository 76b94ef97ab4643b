"""The DiT beyond the fixture: every registry size, other patch sizes, channels and class counts."""
import pytest
import torch
from timm.layers import Mlp as TimmMlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.models.vision_transformer import Attention as TimmAttention

from helpers import tiny_dit
from models import DiT, DiT_models, get_2d_sincos_pos_embed

# Parameter counts of the official models at 256x256 (32x32 latents), 1000 classes.
OFFICIAL_PARAMS = {
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_registry_parameter_counts_match_official(name):
    with torch.device("meta"):  # no memory for 675M parameters
        model = DiT_models[name](input_size=32, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_state_dict_keys_are_the_official_layout():
    keys = set(DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3).state_dict())
    expected = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.bias"}
    expected |= {f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    expected |= {f"blocks.0.{m}.{w}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
                 for w in ("weight", "bias")}
    assert keys == expected


@pytest.mark.parametrize("patch,channels,size", [(1, 3, 8), (2, 4, 8), (4, 1, 16), (8, 3, 32)])
def test_patch_embed_matches_timm(patch, channels, size):
    model = DiT(input_size=size, patch_size=patch, in_channels=channels, hidden_size=24, depth=1, num_heads=2)
    ref = TimmPatchEmbed(size, patch, channels, 24, bias=True)
    ref.load_state_dict(model.x_embedder.state_dict())
    x = torch.randn(3, channels, size, size)
    torch.testing.assert_close(model.x_embedder(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim,heads,tokens", [(32, 2, 16), (48, 3, 64), (96, 4, 4)])
def test_attention_and_mlp_match_timm(dim, heads, tokens):
    block = DiT(input_size=8, patch_size=2, hidden_size=dim, depth=1, num_heads=heads).blocks[0]
    attn = TimmAttention(dim, num_heads=heads, qkv_bias=True)
    mlp = TimmMlp(dim, int(dim * 4.0), act_layer=lambda: torch.nn.GELU(approximate="tanh"), drop=0)
    for p in list(block.parameters()):
        p.data.normal_(0, 0.1)
    attn.load_state_dict(block.attn.state_dict())
    mlp.load_state_dict(block.mlp.state_dict())
    x = torch.randn(5, tokens, dim)
    torch.testing.assert_close(block.attn(x), attn(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(block.mlp(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_unpatchify_inverts_patchify_layout():
    model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=1, num_heads=2, learn_sigma=False)
    img = torch.randn(2, 3, 8, 8)
    # tokens in raster order, each patch flattened as (p, q, c) -- the layout the final linear layer produces
    tokens = img.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    torch.testing.assert_close(model.unpatchify(tokens), img)


def test_guidance_channels():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5).eval()
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    z = torch.randn(2, 4, 8, 8)
    x, t, y = torch.cat([z, z]), torch.tensor([10, 10, 10, 10]), torch.tensor([1, 2, 5, 5])
    with torch.no_grad():
        cond, uncond = model(x, t, y).chunk(2)
        out3 = model.forward_with_cfg(x, t, y, cfg_scale=3.0)[:2]
        out_all = model.forward_with_cfg(x, t, y, cfg_scale=3.0, all_channels=True)[:2]
    guided = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(out3[:, :3], guided[:, :3])
    torch.testing.assert_close(out3[:, 3:], cond[:, 3:])        # official: channel 3 and the variance unguided
    torch.testing.assert_close(out_all[:, :4], guided[:, :4])
    torch.testing.assert_close(out_all[:, 4:], cond[:, 4:])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_dit()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 3])
    drop = torch.zeros(3, dtype=torch.long)
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model(x, t, y, force_drop_ids=drop).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_label_dropout_only_in_training_or_when_forced():
    model = DiT(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    emb = model.y_embedder
    labels = torch.zeros(2000, dtype=torch.long)
    assert (emb.token_drop(labels) == 3).float().mean().item() == pytest.approx(0.1, abs=0.03)
    forced = emb.token_drop(labels[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert forced.tolist() == [3, 0, 3, 0]
    torch.testing.assert_close(emb(labels[:4], train=False), emb.embedding_table.weight[labels[:4]])


def test_pos_embed_is_frozen_and_sincos():
    model = DiT(input_size=16, patch_size=4, hidden_size=32, depth=1, num_heads=2)
    assert not model.pos_embed.requires_grad
    pe = torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float()
    torch.testing.assert_close(model.pos_embed[0], pe)
    assert pe.shape == (16, 32) and pe.abs().max() <= 1.0
    with pytest.raises(ValueError):
        DiT(input_size=10, patch_size=4)
