"""The quantize stage: recipe validation with key paths, ORT PTQ keeps accuracy, pipeline rows, reloads."""
import copy

import pytest
import torch

from compress import QuantizeConfig, TrainConfig, create_data, create_model, load_model, quantize, train
from compress.errors import RecipeError, RecipeErrors
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def data():
    return create_data({"name": "synthetic", "num_samples": 256, "num_classes": 4, "shape": [1, 8, 8],
                        "noise": 0.8, "batch_size": 32})


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    model = create_model("lenet5", data.input_shape, data.num_outputs)
    model, metrics = train(model, TrainConfig(epochs=3, optimizer={"lr": 5e-3}, progress=False), data)
    return model, metrics


def recipe(quantize_options, teacher=False):
    doc = {
        "name": "q", "seed": 0,
        "data": {"name": "synthetic", "num_samples": 128, "num_classes": 3, "shape": [1, 6, 6], "batch_size": 32},
        "model": {"name": "mlp", "hidden": [32]},
        "stages": [{"train": {"epochs": 2, **QUIET}}, {"quantize": quantize_options}],
        "benchmark": {"latency": False, "macs": False},
    }
    if teacher:
        doc["teacher"] = {"name": "mlp", "hidden": [64]}
    return doc


@pytest.mark.parametrize("options,message", [
    ({"method": "qat", "bits": 3}, "stages[1].quantize.bits: expected one of 1, 2, 4, 8, got 3"),
    ({"calibration": {"method": "kl"}},
     "stages[1].quantize.calibration.method: expected one of 'minmax', 'entropy', 'percentile', got 'kl'"),
    ({"calibration": {"batches": 0}}, "stages[1].quantize.calibration.batches: expected an integer >= 1, got 0"),
    ({"calibration": {"batches": -2}}, "stages[1].quantize.calibration.batches: expected an integer >= 1, got -2"),
    ({"method": "binary", "bits": 4}, "stages[1].quantize.bits: binary networks have 1-bit weights; expected 1, got 4"),
    ({"method": "ptq_static", "bits": 4}, "stages[1].quantize.bits: ptq_static quantizes to int8"),
    ({"method": "qat", "kd": {}}, "stages[1].quantize.kd: needs a teacher"),
    ({"method": "int3"}, "stages[1].quantize.method: expected one of 'binary', 'gptq', 'lm_dynamic', 'nbits', "
                         "'ptq_dynamic', 'ptq_static', 'qat', 'weight_only', got 'int3'"),
    ({"method": "ptq_static", "observer": "lsq"}, "stages[1].quantize.observer: unknown"),  # a QAT-only key
])
def test_bad_options_name_the_key_path(options, message):
    with pytest.raises((RecipeError, RecipeErrors)) as err:
        parse_recipe(recipe(options))
    assert message in str(err.value)


def test_fine_tuning_is_on_by_default_only_where_the_method_needs_it():
    assert QuantizeConfig(method="qat", bits=4).finetune_config().epochs == 3
    assert QuantizeConfig(method="binary").finetune_config().epochs == 3
    assert QuantizeConfig(method="weight_only", bits=4).finetune_config().epochs == 0
    assert QuantizeConfig(method="binary").weight_bits == 1 and QuantizeConfig().weight_bits == 8


def test_python_entry_point_checks_cross_key_rules_too(data, trained):
    with pytest.raises(RecipeError, match=r"quantize.bits: 1-bit weights are method 'binary'"):
        quantize(trained[0], QuantizeConfig(method="qat", bits=1), data)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibrated_int8_model_keeps_accuracy_in_onnx_runtime(data, trained, tmp_path, method):
    model, _ = trained
    before = copy.deepcopy(model.state_dict())
    ort_model, m = quantize(model, QuantizeConfig(calibration={"method": method, "batches": 4}), data, out_dir=tmp_path)
    assert m["accuracy"] >= m["fp32_onnx_metrics"]["accuracy"] - 0.02
    assert m["fp32_onnx_metrics"]["accuracy"] > 0.8  # the task was learned, so the check means something
    assert m["size_ratio"] > 2 and m["artifact"].endswith("model_int8.onnx")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # PTQ leaves the model alone
    assert ort_model(data.example_input(5)).shape == (5, data.num_outputs)


def test_dynamic_int8_for_linear_models(data, tmp_path):
    torch.manual_seed(0)
    mlp, fp = train(create_model("mlp", data.input_shape, data.num_outputs, hidden=[64]),
                    TrainConfig(epochs=4, progress=False), data)
    _, m = quantize(mlp, QuantizeConfig(method="ptq_dynamic"), data, out_dir=tmp_path)
    assert m["accuracy"] >= fp["accuracy"] - 0.03 and m["size_ratio"] > 2


def test_weight_only_rounds_then_fine_tunes_and_packs(data, trained, tmp_path):
    model = copy.deepcopy(trained[0])
    cfg = QuantizeConfig(method="weight_only", bits=4, rounds=2, finetune={"epochs": 1, **QUIET})
    model, m = quantize(model, cfg, data)
    assert m["bits"] == 4 and m["weight_compression"] > 6
    assert m["accuracy"] >= trained[1]["accuracy"] - 0.1
    assert model.compress_transforms[-1]["kind"] == "weight_only"


def test_recipe_runs_ptq_and_qat_and_reloads(tmp_path):
    doc = recipe({"method": "ptq_static", "calibration": {"batches": 2}})
    ptq = Pipeline.from_dict(doc).run(out=tmp_path / "ptq")["stages"][1]
    assert ptq["artifact"].endswith(".onnx") and ptq["size_bytes"] == ptq["int8_onnx_bytes"]
    assert 0 <= ptq["metrics"]["accuracy"] <= 1 and ptq["method"] == "ptq_static"
    doc = recipe({"method": "qat", "bits": 4, "observer": "lsq", "keep_first_last": False,
                  "finetune": {"epochs": 1, **QUIET}})
    qat = Pipeline.from_dict(doc).run(out=tmp_path / "run")["stages"][1]
    assert qat["bits"] == 4 and qat["activation_bits"] == 4
    model = load_model(tmp_path / "run" / "stages" / "01_quantize" / "model.pt").eval()
    data = create_data(doc["data"])
    from compress import evaluate

    assert evaluate(model, data, "test")["accuracy"] == pytest.approx(qat["metrics"]["accuracy"])


def test_qat_with_teacher_distillation(tmp_path):
    doc = recipe({"method": "qat", "bits": 8, "kd": {"alpha": 0.5}, "finetune": {"epochs": 1, **QUIET}}, teacher=True)
    doc["stages"].insert(0, {"train": {"target": "teacher", "epochs": 1, **QUIET}})
    report = Pipeline.from_dict(doc).run(out=tmp_path / "run")
    row = report["stages"][-1]
    assert row["bits"] == 8 and "onnx_metrics" in row
    assert abs(row["onnx_metrics"]["accuracy"] - row["metrics"]["accuracy"]) <= 0.02


def test_binary_weights_are_bit_packed_25x_smaller(data, trained):
    mlp = create_model("mlp", data.input_shape, data.num_outputs, hidden=[256, 256])
    _, m = quantize(mlp, QuantizeConfig(method="binary", keep_first_last=False, finetune={"epochs": 0}), data)
    n, channels = 64 * 256 + 256 * 256 + 256 * 4, 256 + 256 + 4
    assert m["weight_bytes"] == n // 8 + 4 * channels and m["fp32_weight_bytes"] == 4 * n
    assert m["weight_compression"] > 25
    model, m = quantize(copy.deepcopy(trained[0]), QuantizeConfig(method="binary", binary="xnor", finetune={"epochs": 0}), data)
    assert m["binary"] == "xnor" and m["quantized_layers"] == 3  # first and last conv/linear stay fp32
    assert isinstance(model.features[0], torch.nn.Conv2d)


def test_qat_kd_freezes_the_teacher_only_while_fine_tuning(data):
    teacher = create_model("mlp", data.input_shape, data.num_outputs, hidden=[32]).train()
    student = create_model("mlp", data.input_shape, data.num_outputs, hidden=[16])
    cfg = QuantizeConfig(method="qat", kd={}, export_onnx=False, finetune={"epochs": 1, **QUIET})
    quantize(student, cfg, data, teacher=teacher)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert not student._forward_pre_hooks  # the KD hook let go of the student


def test_qat_kd_on_a_regression_autoencoder_uses_the_regression_loss_and_beta(monkeypatch):
    import compress.quant.methods.torch_side as quantize_mod

    data = create_data({"name": "synthetic", "task": "regression", "num_samples": 96, "num_classes": 6, "shape": [6]})
    spec = {"name": "autoencoder", "hidden": [8], "clip": None}
    teacher = create_model(spec, data.input_shape, data.num_outputs)
    made, real = [], quantize_mod.kd_hook
    monkeypatch.setattr(quantize_mod, "kd_hook", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    _, m = quantize(create_model(spec, data.input_shape, data.num_outputs), QuantizeConfig(
        method="qat", kd={"beta": 0.5}, export_onnx=False, finetune={"epochs": 1, **QUIET}), data, teacher=teacher)
    assert "rmse" in m and m["bits"] == 8
    assert (made[0].cfg.loss, made[0].cfg.beta, made[0].cfg.alpha) == ("regression", 0.5, 0.1)


def test_each_method_is_its_own_config_class_and_a_new_one_is_a_registration(data, trained, tmp_path):
    from pydantic import Field

    from compress.quant.methods import QUANT_METHODS, register_method
    from compress.quant.methods.ptq import PTQStaticConfig
    from compress.quant.methods.qat import QATConfig

    assert type(QuantizeConfig()) is PTQStaticConfig and type(QuantizeConfig(method="qat")) is QATConfig
    assert isinstance(QuantizeConfig(method="qat"), QuantizeConfig)
    with pytest.raises(RecipeError, match=r"^method: expected one of .*got 'fp8'"):
        QuantizeConfig(method="fp8")

    class HalfConfig(QuantizeConfig):
        """fp16 weights (a toy method for this test)."""

        method: str = "half_test"
        scale: float = Field(1.0, gt=0)

    @register_method(HalfConfig, produces="packed")
    def half(model, cfg, ctx):
        return model.half().float(), {"accuracy": 1.0}, {"method": cfg.method, "scale": cfg.scale}

    try:
        cfg = parse_recipe(recipe({"method": "half_test", "scale": 2})).stages[1].config
        assert type(cfg) is HalfConfig and cfg.scale == 2
        _, m = quantize(copy.deepcopy(trained[0]), cfg, data, out_dir=tmp_path)
        assert m == {"accuracy": 1.0, "method": "half_test", "scale": 2.0}
    finally:
        QUANT_METHODS._entries.pop("half_test")
