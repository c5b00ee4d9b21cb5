from compress.runtime import cpu


def test_cpu_features_name_the_int8_flags():
    f = cpu.cpu_features()
    assert set(f) >= {"arch", "int8_flags", "vnni", "u8s8_saturates"}
    assert set(f["int8_flags"]) <= set(cpu.INT8_FLAGS)
    assert not (f["vnni"] and f["u8s8_saturates"])


def test_int8_uses_the_same_detection():
    from compress.quant import int8

    assert int8.cpu_features is cpu.cpu_features


def test_cpu_model_is_a_name():
    assert isinstance(cpu.cpu_model(), str) and cpu.cpu_model()
