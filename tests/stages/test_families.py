"""Every stage on a tiny model of each family users bring (torchvision, timm CNN and ViT, transformers text
and image), built offline with random weights: the suite's share of ``benchmarks/model_matrix.py``."""
import os
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from compress.checkpoint import load_model, save_model
from compress.data import DataBundle, create_data
from compress.data.inputs import Inputs
from compress.models import create_model
from compress.runtime.onnx import onnx_run, onnx_session
from compress.stages.distill import DistillConfig, distill
from compress.stages.export import ExportConfig, export
from compress.stages.prune import PruneConfig, prune
from compress.stages.quantize import QuantizeConfig, quantize

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.slow
VOCAB = 50
# family -> (model spec, input shape, the extra it needs, a hidden layer for a hint)
FAMILIES = {
    "torchvision_cnn": ({"name": "torchvision:mobilenet_v3_small"}, (3, 32, 32), None, "features"),
    "timm_cnn": ({"name": "timm:convnext_atto", "kwargs": {"dims": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}},
                 (3, 32, 32), "timm", "stages"),
    "timm_vit": ({"name": "timm:vit_tiny_patch16_224",
                  "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}},
                 (3, 32, 32), "timm", "blocks"),
    "hf_text": ({"name": "hf", "config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                                          "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": VOCAB,
                                          "max_position_embeddings": 32}}, (12,), "transformers",
                "model.bert.encoder.layer.1"),
    "hf_vit": ({"name": "hf", "config": {"model_type": "vit", "image_size": 32, "patch_size": 8, "num_channels": 3,
                                         "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                         "intermediate_size": 64}}, (3, 32, 32), "transformers",
               "model.vit.layernorm"),
}
TRAIN = {"epochs": 1, "progress": False, "batch_size": 8, "device": "cpu"}
LOOSE = {"max_rel_diff": 2.0, "min_top1_agreement": 0.0, "max_kernel_diff": 1.0}  # random weights: near-tied logits


def _data(shape):
    if len(shape) == 3:
        return create_data({"name": "synthetic", "num_samples": 32, "num_classes": 4, "shape": list(shape),
                            "batch_size": 8, "eval_batch_size": 8, "val_fraction": 0.25, "test_fraction": 0.25})
    g = torch.Generator().manual_seed(0)
    mask = lambda i: (torch.arange(shape[0]) < shape[0] - i % 4).long()  # noqa: E731  padded tails
    rows = [(Inputs(input_ids=torch.randint(0, VOCAB, shape, generator=g), attention_mask=mask(i)), i % 4)
            for i in range(32)]
    return DataBundle.from_loaders(*(DataLoader(rows[a:b], batch_size=8) for a, b in ((0, 16), (16, 24), (24, 32))))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stage_runs_on_a_tiny_model_of_each_family(family, tmp_path):
    spec, shape, extra, hint = FAMILIES[family]
    if extra:
        pytest.importorskip(extra, reason=f"{extra} is an optional extra of compress")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    data = _data(shape)
    base = create_model(spec, shape, 4)
    fresh = lambda: create_model(spec, shape, 4).train()  # noqa: E731
    x = data.example_input(2)

    distill(fresh(), base.eval(), DistillConfig(hints=[{"student": hint, "teacher": hint}], **TRAIN), data)

    pruned, m = prune(fresh(), PruneConfig(method="channel", sparsity=0.5, steps=1, scope="layer", finetune=TRAIN), data)
    assert m["macs_reduction"] > 1.2
    save_model(pruned, tmp_path / "pruned.pt")
    assert torch.allclose(load_model(tmp_path / "pruned.pt").eval()(x), pruned.eval()(x), atol=1e-4)
    sparse, _ = prune(fresh(), PruneConfig(method="magnitude", sparsity=0.5, steps=1, finetune=TRAIN), data)
    layers = [mod.weight for mod in sparse.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sum(int((w == 0).sum()) for w in layers) >= 0.4 * sum(w.numel() for w in layers)

    for method, opts in (("ptq_static", {"calibration": {"batches": 2}, "check": LOOSE}),
                         ("ptq_dynamic", {"check": LOOSE}),
                         ("qat", {"finetune": TRAIN, "calibration_batches": 2, "check": LOOSE}),
                         ("weight_only", {"bits": 4})):
        q, m = quantize(fresh(), QuantizeConfig(method=method, **opts), data, out_dir=tmp_path / method)
        assert q(x).shape == (2, 4), method

    _, m = export(base.eval(), ExportConfig(), data, path=tmp_path / "m.onnx")
    if len(shape) == 1:  # a new batch size and a new sequence length: the axes are dynamic
        longer = Inputs(input_ids=torch.randint(0, VOCAB, (3, 20)), attention_mask=torch.ones(3, 20, dtype=torch.long))
        assert onnx_run(onnx_session(tmp_path / "m.onnx"), longer).shape == (3, 4)
