"""The official architectures as tables, readable without Keras: `keras-vit list` and error messages need no model.

    VARIANTS          "B/16" -> patch size, width, depth, heads, MLP
    HYBRID_VARIANTS   "R50+B/16" -> its Transformer's row, the patch size on
                      the ResNet's feature map, the ResNet's units per stage
    constructor_name  "B/16" -> "ViT_B16", "R50+B/16" -> "R50_ViT_B16"
    Architecture      what fixes a ViT's weight shapes (width, depth, heads,
                      MLP, patch, ResNet stages): compared between a weights
                      file and a model to say what differs, and which
                      constructor a file was made for

keras_vit.models builds the constructors from these rows; keras_vit.sizes
counts their parameters and multiply-accumulates.
"""

import dataclasses
from typing import Optional

# The official configurations (google-research/vision_transformer, configs/models.py).
VARIANTS = {
    "Ti/16": dict(patch_size=16, hidden_size=192, depth=12, num_heads=3, mlp_dim=768),
    "S/16": dict(patch_size=16, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536),
    "S/32": dict(patch_size=32, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536),
    "B/8": dict(patch_size=8, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "B/16": dict(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "B/32": dict(patch_size=32, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "L/16": dict(patch_size=16, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "L/32": dict(patch_size=32, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H/14": dict(patch_size=14, hidden_size=1280, depth=32, num_heads=16, mlp_dim=5120),
}

# The hybrids of the paper (R50+ViT-B/16) and of the AugReg release, from the
# official configs (vision_transformer configs/models.py). `transformer` is the
# row of VARIANTS whose width, depth, heads and MLP the Transformer has;
# `patch_size` is taken on the ResNet's feature map; `block_sizes` are the
# units per ResNet stage (() = the root block alone, stride 4: R+Ti/16's 8x8
# patches make 32 pixels per token, as the official code and timm compute,
# though its config's comment speaks of /16).
HYBRID_VARIANTS = {
    "R+Ti/16": dict(transformer="Ti/16", patch_size=8, block_sizes=(), width_factor=1),
    "R26+S/32": dict(transformer="S/32", patch_size=1, block_sizes=(2, 2, 2, 2), width_factor=1),
    "R50+B/16": dict(transformer="B/16", patch_size=1, block_sizes=(3, 4, 9), width_factor=1),
    "R50+L/32": dict(transformer="L/32", patch_size=1, block_sizes=(3, 4, 6, 3), width_factor=1),
}


def variant_config(variant):
    """The `ViT()` keywords of a row of VARIANTS or of HYBRID_VARIANTS (for a
    hybrid: its Transformer's row, the patch size on the ResNet's feature map,
    and the ResNet's `block_sizes` and `width_factor`)."""
    if variant in VARIANTS:
        return dict(VARIANTS[variant])
    row = HYBRID_VARIANTS[variant]
    return dict(VARIANTS[row["transformer"]], patch_size=row["patch_size"],
                block_sizes=row["block_sizes"], width_factor=row["width_factor"])


def display_name(variant):
    """"B/16" -> "ViT-B/16"; "R50+B/16" -> "R50+ViT-B/16"."""
    stem, _, transformer = variant.rpartition("+")
    return f"{stem}+ViT-{transformer}" if stem else f"ViT-{variant}"


def constructor_name(variant):
    """"B/16" -> "ViT_B16"; "R50+B/16" -> "R50_ViT_B16"; "R+Ti/16" -> "R_ViT_Ti16"."""
    stem, _, transformer = variant.rpartition("+")
    name = "ViT_" + transformer.replace("/", "")
    return f"{stem}_{name}" if stem else name


# Constructor name -> variant, in the order `keras-vit list` shows them.
CONSTRUCTOR_VARIANTS = {constructor_name(variant): variant for variant in (*VARIANTS, *HYBRID_VARIANTS)}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What fixes the shapes of a ViT's weights. `resnet` is a hybrid's units
    per ResNet stage (() for the root block alone), None without a ResNet."""

    width: int
    depth: int
    heads: int
    mlp: int
    patch: tuple
    resnet: Optional[tuple] = None

    @classmethod
    def of_variant(cls, variant):
        config = variant_config(variant)
        return cls(config["hidden_size"], config["depth"], config["num_heads"], config["mlp_dim"],
                   (config["patch_size"],) * 2, config.get("block_sizes"))

    def differences(self, other, mine="the file", theirs="the model"):
        """["width 768 in the file vs 192 in the model", ...]: `self` is `mine`'s, `other` is `theirs`'."""
        names = {"width": "width", "depth": "depth", "heads": "heads", "mlp": "MLP",
                 "patch": "patch", "resnet": "ResNet units per stage"}
        found = []
        for field, name in names.items():
            if self._shown(field) != other._shown(field):
                found.append(f"{name} {self._shown(field)} in {mine} vs {other._shown(field)} in {theirs}")
        return found

    def _shown(self, field):
        value = getattr(self, field)
        if field == "patch":
            return "x".join(map(str, value))
        if field == "resnet":
            return "none" if value is None else str(tuple(value))
        return str(value)

    def constructor(self):
        """The name of the constructor with this architecture, or None."""
        for name, variant in CONSTRUCTOR_VARIANTS.items():
            if Architecture.of_variant(variant) == self:
                return name
        return None

    def fix(self):
        """What to build for weights of this architecture, as advice in an error line."""
        name = self.constructor()
        if name is not None:
            return f"the weights are {name}'s: build that model (keras_vit.{name}; on the command line --model {name})"
        return (f"build keras_vit.ViT(patch_size={self.patch[0]}, hidden_size={self.width}, depth={self.depth}, "
                f"num_heads={self.heads}, mlp_dim={self.mlp}"
                + (", stem=...)" if self.resnet is not None else ")"))
