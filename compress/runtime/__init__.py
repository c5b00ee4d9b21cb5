"""What runs a model outside training: ONNX export and ORT sessions (``onnx``), latency backends
(``backends``: one registry entry per runtime), the one latency timer (``timing``) and CPU features (``cpu``)."""
