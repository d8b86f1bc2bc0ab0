"""Model registry and the Encoder every stage trains, distils, prunes and exports.

    spec = ModelSpec("resnet18", in_chans=1, stem_stride=2)
    model = create_model(spec)          # Encoder
    model.features(x)  # (B, F)  backbone output after global average pooling
    model.embed(x)     # (B, D)  the embedding edgeclr exports (= features unless a neck is set)
    model.project(x)   # (B, P)  projection head output, used only by the SimCLR loss

Backbones come from torchvision with random init (nothing is downloaded). `stem_stride` adapts
the stem to small images: ResNets downsample by 4 in their stem (7x7/2 conv + max-pool), which
leaves 1x1 maps in the last stage at 32 px; stride 2 (3x3/1 conv + max-pool) or 1 (3x3/1 conv,
no pool, the CIFAR stem) keep more resolution at more cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgeclr.errors import CheckpointError, ConfigError, ModelError
from edgeclr.runtime import Preprocess, default_palette


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: saved in every checkpoint and manifest."""

    name: str  # registry name, e.g. "resnet18"
    in_chans: int = 3  # input channels (1 for grayscale data)
    stem_stride: int | None = None  # total stride of the stem; None = the architecture's default
    width: int | None = None  # ResNet base width (64 in the paper; stages are w, 2w, 4w, 8w); None = 64
    last_stride: int | None = None  # ResNet: stride of the last stage (1 keeps layer3's resolution); None = 2
    embed_dim: int | None = None  # linear neck after the features; None = embed with the features themselves
    head_hidden: int | None = None  # projection head hidden width; None = feature width
    head_out: int = 128  # projection head output width
    head_layers: int = 2  # linear layers in the projection head (SimCLR: 2; 0 = no head, e.g. a distilled student)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown model spec keys {sorted(unknown)}")
        return cls(**d)


# name -> (builder(spec) -> (backbone returning (B, F), F), role)
_REGISTRY: dict[str, tuple[Callable[["ModelSpec"], tuple[nn.Module, int]], str]] = {}


def register(name: str, role: str):
    def deco(fn):
        _REGISTRY[name] = (fn, role)
        return fn

    return deco


def list_models(role: str | None = None) -> list[str]:
    """Registered names, optionally only 'teacher' or 'student' ones."""
    return sorted(n for n, (_, r) in _REGISTRY.items() if role is None or r == role)


def _resnet(arch: str):
    def build(spec: ModelSpec) -> tuple[nn.Module, int]:
        import torchvision

        if arch == "resnet10":  # ResNet-18's layout with one BasicBlock per stage: half the depth, for small students
            from torchvision.models.resnet import BasicBlock, ResNet

            m = ResNet(BasicBlock, [1, 1, 1, 1])
        else:
            m = getattr(torchvision.models, arch)(weights=None)
        stride = 4 if spec.stem_stride is None else spec.stem_stride
        if stride not in (1, 2, 4):
            raise ValueError(f"{spec.name}: stem_stride must be 1, 2 or 4, got {stride}")
        w = spec.width or 64
        if w < 8 or w % 8:
            raise ValueError(f"{spec.name}: width must be a multiple of 8 (>= 8), got {w}")
        if w != 64:  # rebuild the four stages at base width w with torchvision's own blocks
            block = type(m.layer1[0])
            m.inplanes = w
            m.bn1 = nn.BatchNorm2d(w)
            for i, mult in enumerate((1, 2, 4, 8)):
                setattr(m, f"layer{i + 1}", m._make_layer(block, w * mult, len(getattr(m, f"layer{i + 1}")),
                                                          stride=1 if i == 0 else 2))
        if spec.last_stride not in (None, 1, 2):
            raise ValueError(f"{spec.name}: last_stride must be 1 or 2, got {spec.last_stride}")
        if spec.last_stride == 1:  # no downsampling into layer4: its maps keep layer3's size
            first = m.layer4[0]
            conv = first.conv2 if hasattr(first, "conv3") else first.conv1  # Bottleneck strides conv2
            conv.stride = (1, 1)
            first.downsample[0].stride = (1, 1)
        if stride == 4:
            if spec.in_chans != 3 or w != 64:
                m.conv1 = nn.Conv2d(spec.in_chans, w, 7, 2, 3, bias=False)
        else:
            m.conv1 = nn.Conv2d(spec.in_chans, w, 3, 1, 1, bias=False)
            if stride == 1:
                m.maxpool = nn.Identity()
        for mod in m.modules():  # torchvision's ResNet init, for the layers replaced above
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        width = w * 8 * (4 if arch == "resnet50" else 1)
        m.fc = nn.Identity()
        return m, width

    return build


def _mobilenet(arch: str):
    def build(spec: ModelSpec) -> tuple[nn.Module, int]:
        import torchvision

        return _mobilenet_stem(getattr(torchvision.models, arch)(weights=None), spec)

    return build


def _mobilenet_stem(m: nn.Module, spec: ModelSpec) -> tuple[nn.Module, int]:
    """Adapt a torchvision MobileNet's first conv to spec (channels, stride); drop its classifier."""
    stride = 2 if spec.stem_stride is None else spec.stem_stride
    if stride not in (1, 2):
        raise ValueError(f"{spec.name}: stem_stride must be 1 or 2, got {stride}")
    first = m.features[0][0]  # Conv2d(3, c, 3, stride 2)
    if spec.in_chans != 3 or stride != 2:
        m.features[0][0] = nn.Conv2d(spec.in_chans, first.out_channels, 3, stride, 1, bias=False)
    width = m.classifier[0].in_features if isinstance(m.classifier[0], nn.Linear) else m.classifier[-1].in_features
    m.classifier = nn.Identity()
    return m, width


def _mobilenet_v3_minimal(arch: str):
    """MobileNetV3 without squeeze-excitation, with ReLU instead of hard-swish and 3x3 depthwise
    kernels: the idea of timm's `*_minimal` variants. Its layers are ones INT8 runtimes run in
    8 bits (onnxruntime's quantiser leaves HardSwish/HardSigmoid and the SE branch in float, which
    made INT8 MobileNetV3 slower than FP32: docs/compression.md)."""

    def build(spec: ModelSpec) -> tuple[nn.Module, int]:
        from torchvision.models import mobilenetv3 as mv3

        settings, last = mv3._mobilenet_v3_conf(arch)
        settings = [mv3.InvertedResidualConfig(c.input_channels, 3, c.expanded_channels, c.out_channels, False, "RE",
                                               c.stride, c.dilation, 1.0) for c in settings]
        m = mv3.MobileNetV3(settings, last)
        for parent in list(m.features.modules()):  # stem and last conv: hard-swish -> ReLU
            for name, child in parent.named_children():
                if isinstance(child, nn.Hardswish):
                    setattr(parent, name, nn.ReLU(inplace=True))
        return _mobilenet_stem(m, spec)

    return build


for _n in ("resnet18", "resnet34", "resnet50"):
    register(_n, "teacher")(_resnet(_n))
register("resnet10", "student")(_resnet("resnet10"))
for _n in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"):
    register(_n, "student")(_mobilenet(_n))
for _n in ("mobilenet_v3_small", "mobilenet_v3_large"):
    register(_n + "_minimal", "student")(_mobilenet_v3_minimal(_n))


def model_from_checkpoint(ckpt: dict) -> "Encoder":
    """The Encoder a checkpoint describes, with its weights: its spec, then (for a pruned model)
    its channel plan replayed, then its state dict.

    Raises:
        ValueError / RuntimeError / KeyError: the spec, the pruning plan or the weights do not fit.
    """
    model = create_model(ModelSpec.from_dict(ckpt["spec"]))
    if ckpt.get("pruning"):
        apply_pruning(model, ckpt["pruning"], ckpt["preprocess"])
    model.load_state_dict(ckpt["model"])
    return model


def describe(spec: dict) -> str:
    """A spec dict as one line: "resnet18 (in_chans=1, stem_stride=2, ...)"."""
    extras = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name" and v is not None)
    return f"{spec['name']} ({extras})"


def projection_head(in_dim: int, hidden: int, out: int, layers: int = 2) -> nn.Sequential:
    """SimCLR's MLP head: (Linear -> BN -> ReLU) x (layers-1) -> Linear; layers=0: no head."""
    if layers == 0:
        return nn.Sequential()
    mods, d = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out))
    return nn.Sequential(*mods)


class Encoder(nn.Module):
    """backbone -> features (B, F) -> neck -> embedding (B, D) -> head -> projection (B, P); the
    head is the head table's `projection` (HEADS)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.neck = nn.Linear(feature_dim, spec.embed_dim) if spec.embed_dim else nn.Identity()
        self.embed_dim = spec.embed_dim or feature_dim
        self.head = HEADS["projection"].build(self.embed_dim, spec.head_out, spec)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, F)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))  # (B, D)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))  # (B, P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exported function: the embedding, without the projection head."""
        return self.embed(x)


def create_model(spec: ModelSpec | str, **kwargs) -> Encoder:
    """Build an Encoder from a spec or a registry name (kwargs fill the spec).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or a bad spec value.
    """
    if isinstance(spec, str):
        spec = ModelSpec(spec, **kwargs)
    if spec.name not in _REGISTRY:
        raise ValueError(f"unknown model {spec.name!r}; valid: {', '.join(list_models())}")
    if spec.in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {spec.in_chans}")
    backbone, width = _REGISTRY[spec.name][0](spec)
    return Encoder(backbone, width, spec)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one (C, H, W) image through model.embed (an Encoder) or model (any
    other network, e.g. a torchvision reference): every Conv2d and Linear (normalisation and
    activations, a few percent of a CNN's arithmetic, are not counted)."""
    total = 0

    def conv(m, i, o):
        nonlocal total
        total += o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def lin(m, i, o):
        nonlocal total
        total += o.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else lin)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            getattr(model, "embed", model)(torch.zeros(1, *shape, device=next(model.parameters()).device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return int(total)


# ----------------------------------------------------------------------------------------------
# pruning-plan replay: a pruned checkpoint holds weights + the channel plan, never a pickled module


def torch_pruning():
    """The torch-pruning module (the `compress` extra)."""
    try:
        import torch_pruning
    except ImportError as e:
        raise ConfigError("pruning needs torch-pruning: pip install 'edgeclr[compress]'") from e
    return torch_pruning


def example_input(model: Encoder, pp: Preprocess | dict) -> torch.Tensor:
    """A zero batch of one image shaped like the model's input: (1, C, S, S)."""
    pp = Preprocess.from_dict(pp) if isinstance(pp, dict) else pp
    return torch.zeros(1, model.spec.in_chans, pp.input_size, pp.input_size)


def apply_pruning(model: Encoder, plan: dict, pp: Preprocess | dict) -> Encoder:
    """Replay a pruning plan (as saved in a checkpoint) on a freshly built model, in place."""
    tp = torch_pruning()
    try:
        dg = tp.DependencyGraph().build_dependency(model.eval(), example_input(model, pp))
        dg.load_pruning_history([tuple(h) for h in plan["history"]])
    except (KeyError, IndexError, AttributeError, ValueError, RuntimeError) as e:
        raise ValueError(f"the pruning plan does not fit a {model.spec.name} (recorded with torchvision "
                         f"{plan.get('torchvision')}, torch-pruning {plan.get('torch_pruning')}): {str(e)[:200]}") from e
    return model


class EmbeddingModel(nn.Module):
    """What an embedding model exports: images (B, C, S, S) -> embeddings (B, D), L2-normalised when asked."""

    def __init__(self, encoder: nn.Module, normalize: bool):
        super().__init__()
        self.encoder, self.normalize = encoder, normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        e = self.encoder.embed(images)  # (B, D)
        return F.normalize(e, dim=1) if self.normalize else e


class ClassifierNet(nn.Module):
    """encoder -> embedding (B, D) -> standardise (fixed mean / std) -> linear head -> logits (B, K).

    forward() gives softmax probabilities: what is exported."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        d = encoder.embed_dim
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.head = HEADS["linear"].build(d, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.encoder.embed(x) - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(x), dim=1)

    def checkpoint_extras(self) -> dict:
        return {}

    def head_state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in (("mean", self.mean), ("std", self.std),
                                                        ("weight", self.head.weight), ("bias", self.head.bias))}

    def load_head(self, h: dict) -> None:
        with torch.no_grad():
            self.mean.copy_(h["mean"])
            self.std.copy_(h["std"])
            self.head.weight.copy_(h["weight"])
            self.head.bias.copy_(h["bias"])


def classifier_from_checkpoint(ck: dict) -> ClassifierNet:
    """The ClassifierNet a finetune checkpoint holds (its encoder rebuilt from spec, pruning plan and weights)."""
    if ck.get("task") != "classify" or "head" not in ck:
        raise CheckpointError("not a classifier checkpoint (written by `edgeclr finetune --task classify`)")
    net = ClassifierNet(model_from_checkpoint(ck), len(ck["classes"]))
    net.load_head(ck["head"])
    return net.eval()


# ----------------------------------------------------------------------------------------------
# the segmentation heads: DeepLabV3 (ASPP) and LR-ASPP on the encoder's feature maps


def blocks(encoder: Encoder) -> list:
    """The backbone as the callables that take an image batch to its last feature maps, in order:
    a ResNet's stem and its four stages, a MobileNet's `features` blocks."""
    b = encoder.backbone
    if hasattr(b, "layer4"):  # torchvision ResNet
        return [lambda x: b.maxpool(b.relu(b.bn1(b.conv1(x)))), b.layer1, b.layer2, b.layer3, b.layer4]
    return list(b.features)  # torchvision MobileNet


def feature_maps(encoder: Encoder, x: torch.Tensor, tap: int | None = None):
    """The backbone's last feature maps before global pooling: (B, C, h, w); with `tap` (a block
    index, see `blocks`), (that block's output, the last maps)."""
    low = None
    for i, block in enumerate(blocks(encoder)):
        x = block(x)
        if i == tap:
            low = x
    return x if tap is None else (low, x)


def block_shapes(encoder: Encoder, size: int = 64) -> list[tuple[int, int]]:
    """(channels, output stride) after each of the backbone's blocks, for one size x size input."""
    was = encoder.training
    encoder.eval()
    x, out = torch.zeros(1, encoder.spec.in_chans, size, size, device=next(encoder.parameters()).device), []
    with torch.no_grad():
        for block in blocks(encoder):
            x = block(x)
            out.append((x.shape[1], max(1, round(size / x.shape[-1]))))
    encoder.train(was)
    return out


def _strided_conv(block: nn.Module) -> nn.Conv2d:
    return block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck strides conv2, BasicBlock conv1


def output_stride(encoder: Encoder, size: int = 64) -> int:
    """Input size / feature-map size of the encoder's last feature maps."""
    return block_shapes(encoder, size)[-1][1]


def dilate(encoder: Encoder, target: int | None) -> int:
    """Trade the last stages' strides for dilation (weights unchanged) until the output stride is
    <= target; returns the output stride reached. ResNets as DeepLabV3 does (a dilated stage's first
    block keeps the previous rate); MobileNets as torchvision's dilated MobileNetV3 does (every
    depthwise conv from the un-strided block on at the new rate). The stem keeps its stride."""
    os_ = output_stride(encoder)
    if not target or os_ <= target:
        return os_
    b = encoder.backbone
    if not hasattr(b, "layer4"):
        return _dilate_mobilenet(list(b.features), os_, target)
    undo = set()
    for name in ("layer4", "layer3"):
        if os_ <= target:
            break
        if _strided_conv(getattr(b, name)[0]).stride == (2, 2):
            undo.add(name)
            os_ //= 2
    factor = 1
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(b, name)
        first = _strided_conv(layer[0])
        for block in layer:
            for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)):
                d = factor if (conv is first or name not in undo) else factor * 2
                conv.dilation, conv.padding = (d, d), (d, d)
        if name in undo:
            first.stride = (1, 1)
            layer[0].downsample[0].stride = (1, 1)
            factor *= 2
    return os_


def _dilate_mobilenet(features: list, os_: int, target: int) -> int:
    def strided(block):
        return [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]

    undo = set()
    for i in reversed(range(1, len(features))):  # features[0] is the stem
        if os_ <= target:
            break
        if strided(features[i]):
            undo.add(i)
            os_ //= 2
    factor = 1
    for i, block in enumerate(features):
        if i in undo:
            for conv in strided(block):
                conv.stride = (1, 1)
            factor *= 2
        if factor > 1:
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.kernel_size[0] > 1:  # depthwise
                    conv.dilation = (factor, factor)
                    conv.padding = ((conv.kernel_size[0] - 1) // 2 * factor,) * 2
    return os_


def aspp_rates(os_: int) -> tuple[int, int, int]:
    """DeepLabV3's atrous rates: (6, 12, 18) at output stride 16, doubled at 8."""
    return (12, 24, 36) if os_ <= 8 else (6, 12, 18)


class DeepLabV3Head(nn.Sequential):
    """ASPP, 3x3 conv, 1x1 classifier on the last feature maps (torchvision's DeepLabHead). Its width
    follows the backbone's (at most DeepLabV3's 256), so an edge student keeps an edge-sized head."""

    tap = None  # the last maps only

    def __init__(self, shapes: list[tuple[int, int]], num_classes: int):
        from torchvision.models.segmentation.deeplabv3 import ASPP

        c, os_ = shapes[-1]
        width = int(min(256, max(32, c)))
        super().__init__(ASPP(c, list(aspp_rates(os_)), width), nn.Conv2d(width, width, 3, padding=1, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, num_classes, 1))


class LRASPPHead(nn.Module):
    """LR-ASPP (Howard et al. 2019, MobileNetV3's segmentation head; torchvision's LRASPPHead): the
    last maps through a 1x1 conv gated by their global average, upsampled to the maps of twice their
    resolution (`tap`: the last block at half the last maps' stride), each side classified and summed.
    No atrous branches: a head an edge CPU runs for little more than the backbone."""

    def __init__(self, shapes: list[tuple[int, int]], num_classes: int, inter: int = 128):
        from torchvision.models.segmentation.lraspp import LRASPPHead as Head

        super().__init__()
        c, os_ = shapes[-1]
        finer = [i for i, (_, s) in enumerate(shapes) if s < os_]
        if not finer:
            raise ModelError("LR-ASPP needs feature maps finer than the last ones: this backbone has none")
        at_half = [i for i in finer if shapes[i][1] == os_ // 2]
        self.tap = (at_half or finer)[-1]
        self.head = Head(shapes[self.tap][0], c, num_classes, int(min(inter, max(32, c // 2))))

    def forward(self, maps) -> torch.Tensor:
        low, high = maps
        return self.head({"low": low, "high": high})


@dataclasses.dataclass(frozen=True)
class Head:
    """An entry of the head table: what a head reads from the backbone and how it is built.

    reads "pooled": the (B, D) embedding; build(in_dim, out_dim, spec) -> module.
    reads "maps": the backbone's feature maps (and the block `tap` of the built module, for a second,
    finer level); build(block_shapes, num_classes) -> module, at `stride` unless asked otherwise."""

    name: str
    reads: str
    build: Callable
    stride: int | None = None


# the one head table: the SimCLR projection (Encoder), the classifier's linear head (ClassifierNet),
# the segmentation heads (SegmenterNet). Adding a head for a task is an entry here.
HEADS: dict[str, Head] = {
    "projection": Head("projection", "pooled", lambda d, out, spec: projection_head(d, spec.head_hidden or d, out, spec.head_layers)),
    "linear": Head("linear", "pooled", lambda d, out, spec=None: nn.Linear(d, out)),
    "deeplabv3": Head("deeplabv3", "maps", DeepLabV3Head, 8),
    "lraspp": Head("lraspp", "maps", LRASPPHead, 16),
}
SEG_HEADS: dict[str, Head] = {n: h for n, h in HEADS.items() if h.reads == "maps"}  # what a segmenter can carry


def seg_head_for(encoder_name: str, asked: str = "auto") -> str:
    """The head `asked` names; `auto`: LR-ASPP on a MobileNet (the edge head its paper pairs with
    it), DeepLabV3 on a ResNet."""
    if asked != "auto":
        if asked not in SEG_HEADS:
            raise ConfigError(f"unknown segmentation head {asked!r}; valid: auto, {', '.join(SEG_HEADS)}")
        return asked
    return "lraspp" if encoder_name.startswith("mobilenet") else "deeplabv3"


class SegmenterNet(nn.Module):
    """encoder's feature maps -> a segmentation head (SEG_HEADS: DeepLabV3 or LR-ASPP) -> bilinear
    upsampling to the input -> (B, K, H, W). The encoder's last stages are dilated to the output
    stride asked (the head's default when None). forward() gives softmax probabilities: what is exported."""

    def __init__(self, encoder: Encoder, num_classes: int, target_stride: int | None = None, head: str = "deeplabv3"):
        super().__init__()
        if head not in SEG_HEADS:
            raise ConfigError(f"unknown segmentation head {head!r}; valid: {', '.join(SEG_HEADS)}")
        entry = SEG_HEADS[head]
        self.encoder, self.num_classes, self.head_name = encoder, num_classes, head
        self.target_stride = target_stride or entry.stride
        self.output_stride = dilate(encoder, self.target_stride)
        self.head = entry.build(block_shapes(encoder), num_classes)

    def head_state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}

    def checkpoint_extras(self) -> dict:
        """What a segmenter checkpoint holds beyond the classifier's keys."""
        return {"target_stride": self.target_stride, "seg_head": self.head_name,
                "palette": default_palette(self.num_classes).tolist()}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(feature_maps(self.encoder, x, self.head.tap))  # (B, K, h, w)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(x), dim=1)


def segmenter_from_checkpoint(ck: dict) -> SegmenterNet:
    """The SegmenterNet a `finetune --task segment` checkpoint holds (encoder from spec, pruning
    plan and weights; dilation and head from the checkpoint)."""
    if ck.get("task") != "segment" or "head" not in ck:
        raise CheckpointError("not a segmenter checkpoint (written by `edgeclr finetune --task segment`)")
    head = ck.get("seg_head", "deeplabv3")  # a checkpoint from before LR-ASPP holds DeepLabV3
    net = SegmenterNet(model_from_checkpoint(ck), len(ck["classes"]), ck.get("target_stride"), head)
    net.head.load_state_dict(ck["head"])
    return net.eval()
