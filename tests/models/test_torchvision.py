"""torchvision classifiers: head replacement, pretrained weights (file or name), and fine-tuning options."""
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

from compress.checkpoint import load_model, save_model
from compress.data import create_data
from compress.errors import CompressError, RecipeError, RecipeErrors
from compress.models import create_model, parse_model_spec
from compress.models.builtin import find_head
from compress.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """What a torchvision download looks like: a plain state_dict with a 1000-class head."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    return path


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("squeezenet1_1", "classifier.1")])
def test_head_has_the_data_class_count(name, head):
    m = create_model(name, (3, 32, 32), 7).eval()
    assert find_head(m, 7) == head
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_weights_from_local_file_replace_only_the_head(imagenet_file):
    sd = torch.load(imagenet_file, weights_only=True)
    m = create_model({"name": "resnet18", "weights": str(imagenet_file)}, (3, 32, 32), 5)
    own = m.state_dict()
    assert own["fc.weight"].shape == (5, 512)
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    # A head that already has the right class count is kept too.
    full = create_model({"name": "resnet18", "weights": str(imagenet_file)}, (3, 32, 32), 1000)
    assert torch.equal(full.state_dict()["fc.weight"], sd["fc.weight"])


def test_weights_file_is_read_with_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran while loading",))

    bad = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload()}, bad)
    with pytest.raises(CompressError, match="not a loadable weights file"):
        create_model({"name": "resnet18", "weights": str(bad)}, (3, 32, 32), 5)


def test_weights_from_compress_checkpoint_and_round_trip(tmp_path, imagenet_file):
    src = create_model("resnet18", (3, 32, 32), 10)
    ckpt = save_model(src, tmp_path / "ten.pt")
    m = create_model({"name": "resnet18", "weights": str(ckpt)}, (3, 32, 32), 4)
    assert torch.equal(m.state_dict()["layer1.0.conv1.weight"], src.state_dict()["layer1.0.conv1.weight"])
    # A model built with weights reloads from its own checkpoint with the same outputs.
    path = save_model(m, tmp_path / "four.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(load_model(path).eval()(x), m.eval()(x))


def test_weights_that_do_not_fit_fail_clearly(tmp_path):
    other = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(num_classes=1000).state_dict(), other)
    with pytest.raises(CompressError, match="weights do not fit the model: unexpected layer1.2.conv1.weight"):
        create_model({"name": "resnet18", "weights": str(other)}, (3, 32, 32), 5)
    mobile = tmp_path / "mobile.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), mobile)
    with pytest.raises(CompressError, match="'conv1.weight' has shape|missing"):
        create_model({"name": "resnet18", "weights": str(mobile)}, (3, 32, 32), 5)


def test_weights_by_torchvision_name_from_the_hub_cache(tmp_path, monkeypatch):
    """A weights name resolves to torchvision's file; a cached copy is used without network."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "checkpoints" / member.url.rsplit("/", 1)[-1]
    cached.parent.mkdir()
    sd = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(sd, cached)
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        m = create_model({"name": "resnet18", "weights": name}, (3, 32, 32), 3)
        assert torch.equal(m.state_dict()["conv1.weight"], sd["conv1.weight"])


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CompressError, match="could not get ResNet18_Weights.IMAGENET1K_V1 .* pass its path as weights"):
        create_model({"name": "resnet18", "weights": "DEFAULT"}, (3, 32, 32), 3)


@pytest.mark.parametrize("weights, match", [
    ("IMAGENET1K_V9", "model.weights: unknown weights 'IMAGENET1K_V9' for resnet18; expected one of DEFAULT, IMAGENET1K_V1"),
    ("VGG16_Weights.IMAGENET1K_V1", "model.weights: unknown weights 'VGG16_Weights.IMAGENET1K_V1' for resnet18"),
    ("/no/such/resnet.pth", "model.weights: expected an existing weights file"),
])
def test_bad_weights_are_recipe_errors(weights, match):
    with pytest.raises((RecipeError, RecipeErrors), match=match):
        parse_model_spec({"name": "resnet18", "weights": weights})


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 48), (1, 28, 28)])
def test_students_adapt_to_channels_and_image_size(shape):
    for name in ("lenet5", "smallcnn"):
        m = create_model(name, shape, 10).eval()
        assert m(torch.zeros(2, *shape)).shape == (2, 10)
        first = next(mod for mod in m.modules() if isinstance(mod, nn.Conv2d))
        assert first.in_channels == shape[0]


# -- fine-tuning: frozen backbone first, lower backbone LR ----------------------------------------------

@pytest.fixture
def rgb():
    return create_data({"name": "synthetic", "num_samples": 64, "num_classes": 3, "shape": [3, 8, 8], "batch_size": 16})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_freeze_backbone_trains_only_the_head_then_everything(rgb):
    torch.manual_seed(0)
    model = create_model({"name": "smallcnn", "widths": [8, 8]}, (3, 8, 8), 3)
    before = snapshot(model)
    cfg = TrainConfig(epochs=1, freeze_backbone_epochs=1, keep="last", progress=False)
    Trainer(model, cfg, rgb).fit()
    after = snapshot(model)
    for k in before:
        changed = not torch.equal(before[k], after[k])
        # The head moves; the backbone, BatchNorm running statistics included, does not.
        assert changed == k.startswith("classifier."), k
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again for later stages
    Trainer(model, cfg.model_copy(update={"epochs": 2}), rgb).fit()
    assert not torch.equal(after["features.0.weight"], model.state_dict()["features.0.weight"])
    assert not torch.equal(after["features.1.running_mean"], model.state_dict()["features.1.running_mean"])


def test_backbone_lr_mult_makes_two_param_groups(rgb):
    model = create_model({"name": "smallcnn", "widths": [8]}, (3, 8, 8), 3)
    cfg = TrainConfig(epochs=1, optimizer={"name": "sgd", "lr": 0.1, "backbone_lr_mult": 0.01}, progress=False)
    opt = Trainer(model, cfg, rgb)._optimizer()
    head, backbone = opt.param_groups
    assert head["lr"] == 0.1 and pytest.approx(backbone["lr"]) == 0.001
    assert {id(p) for p in head["params"]} == {id(p) for p in model.classifier.parameters()}
    assert len(backbone["params"]) == len(list(model.features.parameters()))
    # The default keeps one group: existing behaviour is unchanged.
    assert len(Trainer(model, TrainConfig(), rgb)._optimizer().param_groups) == 1


def test_backbone_lr_zero_keeps_the_backbone_fixed(rgb):
    """A mult of 0 with SGD (no weight decay) must leave backbone weights exactly where they were."""
    model = create_model({"name": "smallcnn", "widths": [8]}, (3, 8, 8), 3)
    w0 = model.features[0].weight.detach().clone()
    cfg = TrainConfig(epochs=1, optimizer={"name": "sgd", "lr": 0.1, "backbone_lr_mult": 0.0},
                      scheduler={"name": "onecycle"}, progress=False, keep="last")
    Trainer(model, cfg, rgb).fit()
    assert torch.equal(model.features[0].weight, w0)


def test_head_by_name_and_unknown_head(rgb):
    model = create_model({"name": "lenet5"}, (3, 8, 8), 3)
    t = Trainer(model, TrainConfig(head="classifier", optimizer={"backbone_lr_mult": 0.5}), rgb)
    assert len(t._optimizer().param_groups[0]["params"]) == 6  # three Linear layers
    with pytest.raises(CompressError, match="head: no module 'fc'"):
        Trainer(model, TrainConfig(head="fc", freeze_backbone_epochs=1), rgb)._optimizer()
