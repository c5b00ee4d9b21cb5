import torch
import torch.nn as nn

from compress.runtime.backends import BACKENDS, LatencyBackend, onnx_timer, torch_timer
from compress.runtime.onnx import to_onnx


def test_builtin_backends_are_registered():
    assert {"pytorch", "onnxruntime", "cuda"} <= set(BACKENDS.names())
    assert BACKENDS.get("onnxruntime").obj.runs == "onnx" and BACKENDS.get("pytorch").obj.runs == "model"
    assert BACKENDS.get("cuda").obj.gpu and not BACKENDS.get("pytorch").obj.gpu
    assert BACKENDS.get("cuda").obj().available() == torch.cuda.is_available()
    assert all(issubclass(e.obj, LatencyBackend) for e in BACKENDS)


def test_pytorch_backend_times_a_copy_in_eval_mode():
    model = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.5))
    b = BACKENDS.get("pytorch").obj()
    loaded = b.load(model, 1)
    assert loaded is not model and not loaded.training and model.training
    wall, cpu = b.timer(loaded, torch.zeros(3, 4)).timed(2)
    assert wall >= 0 and cpu >= 0


def test_onnxruntime_backend_runs_the_file(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    p = to_onnx(model, torch.zeros(1, 4), tmp_path / "m.onnx")
    b = BACKENDS.get("onnxruntime").obj()
    sess = b.load(p, 1)
    assert sess.get_session_options().intra_op_num_threads == 1
    assert b.timer(sess, torch.zeros(2, 4)).timed(2)[0] > 0


class Session:
    def __init__(self, names=("input",)):
        self.fed, self.names = [], names

    def get_inputs(self):
        return [type("Input", (), {"name": n})() for n in self.names]

    def run(self, outputs, feed):
        self.fed.append({k: v.shape for k, v in feed.items()})


def test_onnx_timer_feeds_the_batch_k_times():
    s = Session()
    onnx_timer(s, torch.zeros(3, 4)).timed(2)
    assert s.fed == [{"input": (3, 4)}, {"input": (3, 4)}]


def test_onnx_timer_feeds_named_inputs_by_name():
    """A text model's batch is a dict (input_ids, attention_mask); inputs the graph lacks are left out."""
    s = Session(("input_ids", "attention_mask"))
    x = {"input_ids": torch.zeros(2, 7), "attention_mask": torch.ones(2, 7), "token_type_ids": torch.zeros(2, 7)}
    onnx_timer(s, x).timed(1)
    assert s.fed == [{"input_ids": (2, 7), "attention_mask": (2, 7)}]


def test_torch_timer_calls_the_model():
    seen = []

    class M(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x

    torch_timer(M(), torch.zeros(5, 1)).timed(2)
    assert seen == [5, 5]
