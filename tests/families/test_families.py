"""The model-family registry: built-in ViT/Swin lookup, a new family in one place, the unsupported-model error."""

import pytest
import torch
from helpers import TINY_MODELS, counted_macs
from torch import nn

import flora_ray as fr
from flora_ray.core.cost import build_cost_model
from flora_ray.core.families import (
    ModelFamily,
    conv_macs,
    family_of,
    linear_fqns,
    register_family,
    registered_families,
    unregister_family,
)
from flora_ray.search.filtering import split_forward


@pytest.mark.parametrize(
    ("model", "family"),
    [("vit", "vit"), ("deit_distilled", "vit"), ("swin", "swin"), ("swin_padded", "swin"), ("levit", "levit")],
)
def test_registry_finds_the_builtin_families(model, family):
    name, kwargs = TINY_MODELS[model]
    assert family_of(fr.create_model(name, device="meta", **kwargs)).name == family


def test_builtin_families_are_registered_swin_first():
    assert [f.name for f in registered_families()][:3] == ["swin", "vit", "levit"]
    vit = family_of(fr.create_model("test_vit", device="meta"))
    assert vit.target_regex() == r"^(?P<block>blocks\.\d+)\.(?:attn\.qkv|mlp\.fc1|mlp\.fc2)$"
    assert vit.target_regex(include_proj=True) == (
        r"^(?P<block>blocks\.\d+)\.(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$"
    )


# --- a new family: a toy transformer that is no timm model ------------------------------------------------------


class ToyAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return self.proj(attn @ v)


class ToyMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ToyBlock(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ToyAttention(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), ToyMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyTransformer(nn.Module):
    """Patch-embedding conv, ``blocks.i`` with ``attn.qkv``/``mlp.fc1``/``mlp.fc2``, mean pooling, a head."""

    def __init__(self, img_size=16, patch=4, in_chans=3, dim=24, depth=3, num_classes=5):
        super().__init__()
        self.img, self.patch = img_size, patch
        self.embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(ToyBlock(dim, 2 * dim) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def tokens(self, x):
        return self.embed(x).flatten(2).transpose(1, 2)

    def head_of(self, x):
        return self.head(self.norm(x).mean(dim=1))

    def forward(self, x):
        x = self.tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.head_of(x)


def toy_geometry(model):
    grid = model.img // model.patch
    seq_len = grid * grid
    tokens = {"head": 1}
    other = conv_macs(model.embed, grid, grid)
    for i, block in enumerate(model.blocks):
        tokens.update({f"blocks.{i}.{fqn}": seq_len for fqn in linear_fqns(block)})
        other += 2 * seq_len * seq_len * block.attn.proj.in_features  # q k^T and attn v
    return tokens, other


def toy_split(model, block_name):
    i = int(block_name.split(".")[1])

    def prefix(x):
        x = model.tokens(x)
        for block in model.blocks[:i]:
            x = block(x)
        return x

    def suffix(x):
        for block in model.blocks[i:]:
            x = block(x)
        return model.head_of(x)

    return prefix, suffix


TOY = ModelFamily(
    name="toy",
    matches=lambda model: isinstance(model, ToyTransformer),
    block_pattern=r"blocks\.\d+",
    token_geometry=toy_geometry,
    split_forward=toy_split,
    img_size=lambda model: (model.img, model.img),
    description="test ToyTransformer",
)


@pytest.fixture
def toy_family():
    register_family(TOY)
    yield TOY
    unregister_family(TOY.name)


def test_a_registered_family_gets_supernet_cost_and_split_forward(toy_family):
    dense = ToyTransformer().eval()
    x = torch.randn(2, 3, *toy_family.img_size(dense))
    with torch.no_grad():
        expected = dense(x)
    dense_macs = counted_macs(dense, x[:1])
    dense_params = sum(p.numel() for p in dense.parameters())

    supernet = fr.build_supernet(dense, ratios=[0.5, 1.0]).eval()  # modifies `dense` in place
    assert family_of(supernet.model) is toy_family
    assert supernet.space.fqns == tuple(f"blocks.{i}.{n}" for i in range(3) for n in ("attn.qkv", "mlp.fc1", "mlp.fc2"))
    assert [b.name for b in supernet.space.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert supernet.cost.dense_macs == dense_macs
    assert supernet.cost.dense_params == dense_params
    smallest = supernet.space.smallest()
    assert supernet.cost.macs(smallest) == counted_macs(fr.extract_subnet(supernet, smallest), x[:1])

    supernet.set_max_ranks()
    with torch.no_grad():
        for block in supernet.space.blocks:
            prefix, suffix = split_forward(supernet.model, block.name)
            torch.testing.assert_close(suffix(prefix(x)), expected, rtol=1e-5, atol=1e-5)


def test_registration_is_checked_and_undone(toy_family):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_family(toy_family)
    unregister_family("toy")
    assert family_of(ToyTransformer()) is None
    register_family(toy_family)  # for the fixture's teardown
    with pytest.raises(ValueError, match="no model family named 'nope'"):
        unregister_family("nope")


def test_unsupported_model_is_a_one_line_error_naming_the_families():
    model = ToyTransformer()  # the toy family is not registered here
    with pytest.raises(ValueError, match="no analytic cost model for ToyTransformer") as raised:
        build_cost_model(model)
    message = str(raised.value)
    assert "\n" not in message and "swin (timm SwinTransformer)" in message and "vit (timm Vision" in message
    with pytest.raises(ValueError, match=r"has no flora-ray preset .*swin.*vit.* targets=REGEX"):
        fr.build_supernet(model)
    prefix, suffix = split_forward(model, "blocks.1")  # unknown model: identity prefix, full forward
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(suffix(prefix(x)), model(x))


def test_levit_preset_names_its_projections_for_include_proj():
    levit = family_of(fr.create_model("levit_128s", device="meta"))
    assert fr.create_model("levit_conv_128s", device="meta") is not None
    assert family_of(fr.create_model("levit_conv_128s", device="meta")) is None  # 1x1 convolutions, no Linear
    regex = levit.target_regex(include_proj=True)
    assert regex.startswith(r"^(?P<block>stages\.\d+\.(?:blocks\.\d+|downsample))\.(?:attn\.qkv\.linear|")
    assert r"|attn\.proj\.ln\.linear|attn_downsample\.proj\.ln\.linear|" in regex
    assert "proj" not in levit.target_regex()
