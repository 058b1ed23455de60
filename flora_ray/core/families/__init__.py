"""Model families: everything flora-ray knows about one architecture, behind a small registry.

A ``ModelFamily`` says which models it covers (``matches``), where their factorisable layers are (a block
pattern plus the layer names inside a block), how many tokens each Linear layer sees and how many MACs run
outside Linear layers (``token_geometry``, for the analytic cost model), how to run a model up to a block and from
it on (``split_forward``, for candidate filtering) and the input size (``img_size``).

The built-in families (timm Swin, ViT/DeiT and the hybrid LeViT) live one per module in this package and register themselves on
import; supporting another architecture is one more module (or a few lines in user code)::

    from flora_ray.core.families import ModelFamily, register_family

    register_family(ModelFamily("mine", lambda m: isinstance(m, MyNet), r"blocks\\.\\d+", my_geometry))

``family_of(model)`` returns the first registered family that matches, in registration order (Swin, ViT, LeViT).
"""

# isort: off
from flora_ray.core.families.base import (
    DEFAULT_LAYERS,
    DEFAULT_PROJ_LAYERS,
    conv_macs,
    describe_families,
    family_of,
    Forward,
    is_linear,
    linear_fqns,
    ModelFamily,
    patch_embed_img_size,
    register_family,
    registered_families,
    Split,
    TokenGeometry,
    unregister_family,
)

# Built-in families, registered on import; the order is the matching precedence (Swin, ViT, LeViT).
from flora_ray.core.families import swin, vit  # noqa: F401
from flora_ray.core.families import levit  # noqa: F401
# isort: on

__all__ = [
    "DEFAULT_LAYERS",
    "DEFAULT_PROJ_LAYERS",
    "Forward",
    "ModelFamily",
    "Split",
    "TokenGeometry",
    "conv_macs",
    "describe_families",
    "family_of",
    "is_linear",
    "linear_fqns",
    "patch_embed_img_size",
    "register_family",
    "registered_families",
    "unregister_family",
]
